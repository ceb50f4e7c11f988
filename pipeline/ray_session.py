"""Ray start-up for the commands that run on Ray: connect to a cluster, or start a quiet
local Ray, and shut down only what was started here."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to `address`, or start a local Ray of `num_cpus` CPUs (None: all) without a
    dashboard; Ray already up is used as it is. Yields whether this call started Ray, and
    shuts it down on exit if so (ending that Ray's actors and tasks, stalled ones too).
    Ray is imported here, so that importing this module (and the tools that start Ray only
    for some commands) does not import it."""
    import ray

    if ray.is_initialized():
        yield False
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # keep Ray's token authentication default, without the warning that announces it
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield True
    finally:
        ray.shutdown()
