"""What a run prints while it runs: Ray Data's progress as bars on a terminal, and as one
line now and then in a log (stdout not a terminal: a file, a pipe, a Ray job's log).

A dataset takes a copy of Ray Data's settings when it is built, so the driver calls
`quiet_progress` before building it. In a log, only the total is written (rows so far,
resources), every LOG_INTERVAL_S instead of a block per operator every 10 s; Ray Data's
notes on starting a dataset, its plan and its choice of display are left out. Warnings
and errors are kept.
"""

import logging
import os
import sys

LOG_INTERVAL_S = 60  # seconds between progress lines in a log
QUIET = (  # Ray Data's INFO lines about a dataset starting, its plan and its progress display
    "ray.data._internal.execution.streaming_executor",
    "ray.data._internal.progress",
)


def quiet_progress() -> None:
    """Set Ray Data's progress display for this driver (see the module doc)."""
    # read by Ray Data when it first logs progress (not a terminal)
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(LOG_INTERVAL_S))
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = True
    context.enable_operator_progress_bars = sys.stdout.isatty()  # a log: the total only
    context.use_ray_tqdm = False  # the driver draws plain tqdm bars on its terminal
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # the progress lines themselves, and not the note that operator bars are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.progress.logging_progress").setLevel(logging.INFO)
