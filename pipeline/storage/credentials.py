"""Credentials stay out of URLs: they come from the environment or the provider's own
configuration (AWS_* variables or ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, instance roles,
a Kubernetes Secret), never from a command line, a manifest or a log line.

`refuse_credentials` rejects URLs that carry a password (`s3://KEY:SECRET@bucket/...`) or
a signed/token query parameter (`?X-Amz-Signature=...`, `?sig=...`, `?token=...`);
`redact` masks them (user info and secret values) for messages.

`check_writable` probes an object-store output before a run starts (the bucket exists, a
probe object can be written and deleted, within PROBE_TIMEOUT_S), and `explained` turns
what a store answers to missing or wrong credentials, an endpoint that does not answer or
a missing bucket into one StorageAccessError naming the URL, what failed and where
credentials come from.
"""

import contextlib
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# query parameters of presigned URLs, SAS tokens and API keys
SECRET_PARAMETERS = re.compile(
    r"^(x-(amz|goog)-(signature|credential|security-token)|sig|signature|token|access_token"
    r"|api_?key|key|password|secret|credential)$",
    re.IGNORECASE,
)
# environment variable names that hold secrets
SECRET_NAMES = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|KEY", re.IGNORECASE)
HINT = (
    "pass credentials through the environment or the provider's configuration "
    "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, "
    "a Kubernetes Secret), not in URLs or on the command line"
)


def _has_secret(url: str) -> bool:
    if "://" not in url:
        return False
    parts = urlsplit(url)
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    return parts.password is not None or any(SECRET_PARAMETERS.match(k) for k in keys)


def _redact_part(url: str) -> str:
    if not _has_secret(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"***@{netloc.rpartition('@')[2]}"
    query = [
        (k, "***" if SECRET_PARAMETERS.match(k) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*/")))


def redact(url: str) -> str:
    """`url` with passwords and secret query values replaced by `***` (fsspec chained URLs
    such as `simplecache::s3://...` included); other URLs unchanged."""
    return "::".join(_redact_part(part) for part in url.split("::"))


def has_credentials(url: str) -> bool:
    """Whether `url` carries a password or a secret query parameter."""
    return any(_has_secret(part) for part in url.split("::"))


def refuse_credentials(values: list[str | None]) -> None:
    """Raise ValueError naming (redacted) every value that embeds credentials."""
    bad = [redact(v) for v in values if v and has_credentials(v)]
    if bad:
        raise ValueError(f"credentials in URLs are refused: {', '.join(bad)}; {HINT}")


PROBE_TIMEOUT_S = 20.0  # the longest the probe waits for the store to answer
CONNECT_TIMEOUT_S = 5.0  # the longest it waits for the endpoint to accept a connection
PROBE_DIR = "_lock"  # where the probe object is written (and deleted at once)
SOURCES = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws (or an instance role), and "
    "AWS_ENDPOINT_URL for S3-compatible servers",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the machine's service account",
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")


class StorageAccessError(OSError):
    """An output cannot be read or written: credentials, endpoint or bucket."""


def _protocol(store) -> str:
    protocols = store.fs.protocol
    first = protocols[0] if isinstance(protocols, tuple) else protocols
    return {"s3a": "s3", "gcs": "gs"}.get(first, first)


def _what_failed(err: BaseException) -> str | None:
    """What an exception from a store means for the user; None when it is no access error."""
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err) or type(err).__name__
    if names & set(_NO_CREDENTIALS):
        return f"no credentials found ({text})"
    if names & set(_UNREACHABLE) or isinstance(err, ConnectionError | TimeoutError):
        return f"the endpoint does not answer ({text})"
    if isinstance(err, PermissionError):
        return f"access denied: wrong credentials, or no permission there ({text})"
    if isinstance(err, FileNotFoundError):
        return f"the bucket does not exist ({text})"
    return None


def _error(store, action: str, why: str) -> StorageAccessError:
    where = SOURCES.get(_protocol(store), "the environment or the provider's configuration")
    return StorageAccessError(
        f"cannot {action} {redact(store.display())}: {why}. Credentials and endpoints come "
        f'from {where}; see the README, "Object stores"'
    )


@contextlib.contextmanager
def explained(store, action: str = "read") -> Iterator[None]:
    """Within the block, access errors of `store` (a pipeline.storage.store.Store) become one
    StorageAccessError naming its URL; other errors pass unchanged."""
    try:
        yield
    except StorageAccessError:
        raise
    except Exception as err:
        why = _what_failed(err)
        if why is None:
            raise
        raise _error(store, action, why) from None


def _endpoint(store) -> str | None:
    """The URL of the object store's endpoint (S3: the client's, GCS: its location)."""
    try:
        if _protocol(store) == "s3":
            return store.fs.s3.meta.endpoint_url
        return getattr(store.fs, "_location", None)
    except Exception:  # noqa: BLE001 - no endpoint known: the probe itself will tell
        return None


def _connect(url: str) -> None:
    """Open and close a TCP connection to `url`'s host and port (ConnectionError if none)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"{url}: {err}") from None


def check_writable(store, timeout: float = PROBE_TIMEOUT_S) -> None:
    """On an object store (not a local disk), check within `timeout` seconds that the
    endpoint accepts connections (CONNECT_TIMEOUT_S), that the output's bucket exists (some
    servers create a missing bucket on the first write) and that a probe object under
    `OUT/_lock/` can be written and deleted: one HEAD, one PUT, one DELETE. Raises
    StorageAccessError naming what failed."""
    if store.local or "://" not in store.url:
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            endpoint = _endpoint(store)
            if endpoint:  # a closed or filtered port answers here at once, not after retries
                _connect(endpoint)
            bucket = store.root.split("/", 1)[0]
            # exists() answers False for every failure: ls() says which one it was
            if _protocol(store) in SOURCES and not store.fs.exists(bucket):
                store.fs.ls(bucket)
            name = f"{PROBE_DIR}/.probe-{uuid.uuid4().hex}"
            store.write(name, b"")
            store.delete([store.path(name)])
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True, name="gemlabel-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise _error(store, "write to", f"the store did not answer within {timeout:.0f} s")
    if outcome[0] is not None:
        with explained(store, "write to"):
            raise outcome[0]
