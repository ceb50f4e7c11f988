"""Credentials stay out of URLs: they come from the environment or the provider's own
configuration (AWS_* variables or ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, instance roles,
a Kubernetes Secret), never from a command line, a manifest or a log line.

`refuse_credentials` rejects URLs that carry a password (`s3://KEY:SECRET@bucket/...`) or
a signed/token query parameter (`?X-Amz-Signature=...`, `?sig=...`, `?token=...`);
`redact` masks them (user info and secret values) for messages.
"""

import re
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
