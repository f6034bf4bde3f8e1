"""Real servers for remote shard sets, on 127.0.0.1 only, started and stopped by the tests (and the benchmark):

- `RangeHTTPServer`: serves a folder over HTTP/1.1 with Range requests (Python's http.server does not do Range),
  counts the body bytes it sends, and can inject faults into shard reads (`faults`, taken one per GET of a shard:
  "503", "drop" = close the connection half way through the body, "stall" = send nothing for `stall_seconds`,
  "ok" = no fault), or refuse every request with 403 Forbidden (`deny = True`: a set without read access);
- `S3Server`: moto's S3-compatible server (ThreadedMotoServer) on a free port, with `upload` to put a shard-set
  folder into a bucket, and `env()` the AWS_* variables a client needs (dummy credentials, AWS_ENDPOINT_URL).
Every wait here is bounded and names what did not come.
"""
from __future__ import annotations

import base64
import logging
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

START_TIMEOUT = 30.0  # seconds a server may take to listen
CHUNK = 1 << 20


class ShardRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD of files under the server's root, with single-range `Range: bytes=a-b` requests (206)."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for a shard's ranged requests

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name) - quiet in test output
        pass

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.serve(body=True)

    def target(self) -> Path | None:
        root: Path = self.server.root
        path = (root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        return path if path.is_file() and root in path.parents else None

    def byte_range(self, size: int) -> tuple[int, int] | None:
        """(start, end exclusive) of the request's Range, the whole file without one; None: unsatisfiable."""
        header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip()) if header else None
        if not match:
            return 0, size
        first, last = match.groups()
        if not first:  # a suffix range: the last N bytes
            return max(0, size - int(last)), size
        start, end = int(first), min(size, int(last) + 1 if last else size)
        return (start, end) if start < size else None

    def serve(self, body: bool) -> None:
        if self.server.deny:
            self.send_error(403, "Forbidden")
            return
        if self.server.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.server.credentials).encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        path = self.target()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        span = self.byte_range(size)
        if span is None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        fault = self.server.take_fault(path) if body else None
        if fault == "503":
            self.send_error(503, "injected fault")
            return
        start, end = span
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self.send_body(path, start, end, fault)

    def send_body(self, path: Path, start: int, end: int, fault: str | None) -> None:
        if fault == "stall":
            time.sleep(self.server.stall_seconds)
        stop = start + (end - start) // 2 if fault == "drop" else end
        with open(path, "rb") as f:
            f.seek(start)
            pos = start
            while pos < stop:
                chunk = f.read(min(CHUNK, stop - pos))
                self.wfile.write(chunk)
                pos += len(chunk)
                self.server.count(len(chunk))
        if fault == "drop":
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)  # the client sees its body cut short


class RangeHTTPServer(ThreadingHTTPServer):
    """A folder served on 127.0.0.1 (a free port) with Range support; `with RangeHTTPServer(folder) as s:` runs it in
    a thread until the block ends. s.url(name) is a file's URL; s.bytes_sent the body bytes sent so far.
    faults: planned faults taken in order by GETs of files whose name ends in `fault_suffix` (the shards)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: str | Path, fault_suffix: str = ".tar", stall_seconds: float = 5.0):
        super().__init__(("127.0.0.1", 0), ShardRequestHandler)
        self.root = Path(root).resolve()
        self.fault_suffix = fault_suffix
        self.stall_seconds = stall_seconds
        self.faults: list[str] = []
        self.deny = False
        self.credentials: tuple[str, str] | None = None  # (user, password) of HTTP basic auth, when set
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, name: str = "") -> str:
        return f"{self.base_url}/{name}"

    def count(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_sent += nbytes

    def take_fault(self, path: Path) -> str | None:
        with self.lock:
            if self.faults and path.name.endswith(self.fault_suffix):
                fault = self.faults.pop(0)
                return None if fault == "ok" else fault
        return None

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client gone after an injected fault is expected
            super().handle_error(request, client_address)

    def __enter__(self) -> "RangeHTTPServer":
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=START_TIMEOUT)


class S3Server:
    """moto's S3 API on 127.0.0.1 (a free port) in a thread: `with S3Server() as s3:`; s3.endpoint, s3.env()."""

    def __init__(self):
        from moto.server import ThreadedMotoServer  # lazy: a dev dependency of the remote-shard tests only
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    def __enter__(self) -> "S3Server":
        starter = threading.Thread(target=self.server.start, daemon=True)
        starter.start()
        starter.join(timeout=START_TIMEOUT)  # start() waits without a bound for a server that failed to bind
        if starter.is_alive():
            raise RuntimeError(f"moto's S3 server did not start listening on 127.0.0.1 within {START_TIMEOUT} s")
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    def env(self) -> dict[str, str]:
        """What a client of this server needs: dummy credentials, a region, the endpoint, and no instance-role
        lookup (a client without credentials would ask the metadata address, which is not on this machine)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3  # lazy: installed with moto and s3fs
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def require_signatures(self, on: bool) -> None:
        """Whether the server checks each request's credentials (moto's /moto-api/reset-auth): on, the dummy keys
        of env() and any other are refused with 403 InvalidAccessKeyId, as a store refuses a wrong key."""
        import requests  # lazy: installed with moto
        answer = requests.post(f"{self.endpoint}/moto-api/reset-auth", data="0" if on else "inf", timeout=10)
        answer.raise_for_status()

    def upload(self, folder: str | Path, bucket: str, prefix: str) -> str:
        """Every file of `folder` put under s3://bucket/prefix/ (the bucket made); the set's URL."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"
