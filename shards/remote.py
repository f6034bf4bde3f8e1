"""Where a shard set lives when it is not a local folder: a URL of any fsspec protocol whose package is installed
(`s3://bucket/prefix` through s3fs, `http(s)://host/prefix` through aiohttp, `gs://` through gcsfs, ...).

A URL set's small files are read whole (`read_url`); its shards are never copied to disk: `open_shard` gives a
seekable file whose thread fetches ranged requests of up to `RemoteReads.block_size` bytes ahead of the reader
(HTTP Range, S3 ranged GET), and the next shard's first block when told which it is, each with a timeout, a failed
request retried from the byte where it stopped; `read_ranges` fetches many byte
ranges of one shard at once (a resumed stream's buffer). Credentials come from where the protocol's library looks
(for S3: the environment, ~/.aws, an instance role; the endpoint from AWS_ENDPOINT_URL), never from a config, and
an error names the credential source tried, never a key.

webdataset's `pipe:COMMAND` form (`pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -`, brace lists expanded
by `expand_pipe`) is a list of shards each written by a shell command to its stdout: `PipeShard` reads it forward
only (each wait bounded by a timeout, a failed command run again and read up to where it stopped), and a byte
range of it costs reading the shard from its start up to that range (`read_ranges` says how much in `spent`).
`not_a_plain_tar` says why a shard file (local or at a URL) is not a plain tar the trainer can read.
A leaf: the trainer's config checks and data stream and the shard tools read it; it imports no project module, and
fsspec and its protocol packages only when a URL is used.
"""
from __future__ import annotations

import bisect
import netrc
import os
import queue
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PIPE = "pipe:"
PIPE_CHUNK = 1 << 20  # the most bytes taken from a command's stdout at once
# a URL's user:password@ part (http://user:pass@host/..., s3://KEY:SECRET@bucket/...): the password is never shown
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:?#\s]*):(?P<password>[^@\s]*)@")


def redact_url(text: object, *urls: object) -> str:
    """`text` (a URL, or a message naming URLs) with the password of each URL in it replaced by ***, and each
    password of `urls` (the URLs the message is about) wherever else it shows (a library's error may quote a
    bucket name `KEY:SECRET@bucket` without its scheme): every message and log line that names a shard set's URL
    goes through here."""
    secrets = {m["password"] for url in urls for m in _PASSWORD.finditer(str(url)) if m["password"]}
    text = _PASSWORD.sub(lambda m: f"{m['head']}:***@", str(text))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def has_password(url: object) -> bool:
    """Whether a URL carries a password (user:password@): a credential that a config would keep."""
    return any(m["password"] for m in _PASSWORD.finditer(str(url)))


CREDENTIAL_PLACES = ("http(s): ~/.netrc (`machine HOST login USER password PASSWORD`; NETRC=FILE names another), "
                     "s3: the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), ~/.aws or an "
                     "instance role")


def netrc_entry(url: str) -> str | None:
    """The netrc file (NETRC, else ~/.netrc) holding a login for the URL's host, or None: what an http(s) read sends."""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    host = urlsplit(url).hostname or ""
    try:
        return path if netrc.netrc(path).authenticators(host) else None
    except (OSError, netrc.NetrcParseError):
        return None


def is_url(location: str | Path) -> bool:
    """Whether a shard-set location or shard names a URL (`scheme://...`) rather than a local path."""
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


def is_pipe(location: str | Path) -> bool:
    """Whether a shard set or shard is webdataset's `pipe:COMMAND` form (a command writes the tar to stdout)."""
    return isinstance(location, str) and location.startswith(PIPE)


def expand_pipe(spec: str) -> list[str]:
    """One `pipe:COMMAND` per shard of a spec with brace lists, as webdataset expands them:
    `pipe:cat d/s-{000000..000002}.tar` -> `pipe:cat d/s-000000.tar`, ... (ValueError: no command)."""
    import braceexpand  # lazy: installed with webdataset, needed only by pipe: sets
    shards = list(braceexpand.braceexpand(spec))
    if not shards or any(not s[len(PIPE):].strip() for s in shards):
        raise ValueError(f"{spec!r} names no command after {PIPE!r}")
    return shards


def pipe_program(spec: str) -> str | None:
    """The program a `pipe:` spec runs, when it cannot be found on PATH (else None): checked before training."""
    try:
        words = shlex.split(spec[len(PIPE):])
    except ValueError:
        return None  # unbalanced quotes: the shell names it when the command runs
    if words and "=" not in words[0] and not shutil.which(words[0]):
        return words[0]
    return None


class SetRoot(str):
    """A URL shard-set root that joins names like a Path does (`root / "manifest.json"`), keeping its `//`."""

    def __truediv__(self, name: str) -> "SetRoot":
        return SetRoot(f"{self.rstrip('/')}/{name}")


def set_root(location: str | Path) -> Path | SetRoot:
    """A shard set's root: a local Path, or a SetRoot for a URL (no trailing slash)."""
    return SetRoot(location.rstrip("/")) if is_url(location) else Path(location)


@dataclass(frozen=True)
class RemoteReads:
    """How shards at a URL are read: sequential ranged requests of up to block_size bytes (the first one block_size
    / 8, then doubling), fetched by a thread ahead of the reader (RetryingShard), each request bounded by `timeout`
    seconds; a failed request (connection reset, timeout, 5xx/429, a body cut short) is retried `retries` times from
    the byte where it stopped, after backoff, 2 x backoff, ... seconds (at most backoff_max)."""

    block_size: int = 8 * 2**20
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 10.0


class ShardUnreachableError(OSError):
    """A shard at a URL that could not be read after its retries. `kind` names its bad-sample kind."""

    kind = "unreachable_shard"


def storage_options(url: str, reads: RemoteReads) -> dict:
    """fsspec options for a URL's protocol: every request with a timeout; S3's endpoint from AWS_ENDPOINT_URL(_S3).
    Retries are ours (RetryingShard), so the libraries' own are kept short."""
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        import aiohttp  # lazy: only HTTP shard sets need it (fsspec's HTTP filesystem is built on it)
        # trust_env: credentials from ~/.netrc (or NETRC), proxies from HTTP(S)_PROXY, as curl and pip take them
        return {"client_kwargs": {"trust_env": True,
                                  "timeout": aiohttp.ClientTimeout(total=None, sock_connect=reads.timeout,
                                                                   sock_read=reads.timeout)}}
    if protocol in ("s3", "s3a"):
        options: dict = {"config_kwargs": {"connect_timeout": reads.timeout, "read_timeout": reads.timeout,
                                           "retries": {"max_attempts": 1}}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        return options
    return {}


def url_filesystem(url: str, reads: RemoteReads | None = None):
    """(fsspec filesystem, path inside it) of a URL; the filesystem is cached by fsspec per process."""
    import fsspec  # lazy: only URL shard sets need it
    return fsspec.core.url_to_fs(url, **storage_options(url, reads or RemoteReads()))


def s3_credential_source() -> str:
    """Which credential source an S3 request used, in words (never the key itself)."""
    try:
        import botocore.session  # lazy: installed with s3fs, needed only to name the source in an error
        credentials = botocore.session.get_session().get_credentials()
    except Exception as e:  # a broken ~/.aws/config: say so instead of hiding the first error
        return f"credential lookup failed ({type(e).__name__}: {e})"
    if credentials is None:
        return "no credentials found (looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance role)"
    names = {"env": "environment (AWS_ACCESS_KEY_ID)", "shared-credentials-file": "~/.aws/credentials",
             "config-file": "~/.aws/config", "iam-role": "instance role", "container-role": "container role",
             "assume-role": "assumed role (~/.aws/config)", "sso": "AWS SSO (~/.aws/config)"}
    profile = os.environ.get("AWS_PROFILE")
    source = names.get(credentials.method, credentials.method)
    return f"{source}, profile {profile}" if profile and "~/.aws" in source else source


def access_detail(url: str, err: Exception) -> str:
    """Why `url` could not be read, in words: the error, and for S3 the endpoint and credential source tried."""
    reason = f"{type(err).__name__}: {err}".strip().rstrip(":")
    if url.lower().startswith(("s3://", "s3a://")) and _PASSWORD.match(url):  # the library read KEY:SECRET@bucket
        return ("credentials written in an s3:// URL are not used (s3://KEY:SECRET@bucket names no bucket): remove "
                "them from the URL and give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), "
                "~/.aws or an instance role")
    if url.lower().startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default"
        reason += f" (endpoint {endpoint}; credentials: {s3_credential_source()})"
    elif url.lower().startswith(("http://", "https://")) and getattr(err, "status", None) in (401, 403):
        sent = netrc_entry(url)
        reason += (f" (credentials: the login for {urlsplit(url).hostname} in {sent}, refused)" if sent else
                   f" (credentials: none sent; give them in ~/.netrc: `machine {urlsplit(url).hostname} login USER "
                   "password PASSWORD`, or NETRC=FILE)")
    return redact_url(" ".join(reason.split()), url)  # one line: library messages may hold newlines


def access_error(url: str, err: Exception) -> str:
    """One line on why `url` could not be read (access_detail)."""
    return redact_url(f"cannot read {url}: {access_detail(url, err)}", url)


def retry_delay(reads: RemoteReads, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based): bounded exponential backoff."""
    return min(reads.backoff * 2**attempt, reads.backoff_max)


def is_permanent(err: Exception) -> bool:
    """A missing file or a refused credential (S3's PermissionError, HTTP's 401 / 403): retrying cannot make it
    work."""
    return (isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError))
            or getattr(err, "status", None) in (401, 403))


def with_retries(url: str, reads: RemoteReads, request):
    """request() retried on any failure but a permanent one, reads.retries times after bounded exponential
    backoff; then ShardUnreachableError naming the URL."""
    attempt = 0
    while True:
        try:
            return request()
        except Exception as err:  # fsspec's protocols raise their libraries' own errors (aiohttp, botocore)
            if is_permanent(err) or attempt >= reads.retries:
                raise ShardUnreachableError(redact_url(f"{url}: {type(err).__name__}: {err} (after {attempt} retries)",
                                                       url)) from err
            time.sleep(retry_delay(reads, attempt))
            attempt += 1


def read_url(url: str, reads: RemoteReads | None = None) -> bytes:
    """A small file at a URL, whole (manifest, vocabularies); a missing one raises FileNotFoundError."""
    reads = reads or RemoteReads()
    fs, path = url_filesystem(url, reads)
    try:
        return with_retries(url, reads, lambda: fs.cat_file(path))
    except ShardUnreachableError as err:
        cause = err.__cause__
        if is_permanent(cause):  # an OSError for every caller: a refused HTTP read is aiohttp's own error type
            raise cause if isinstance(cause, OSError) else PermissionError(access_detail(url, cause)) from None
        raise


AHEAD_BLOCKS = 2  # blocks a shard's fetcher thread may hold ahead of its reader
FIRST_BLOCK_MIN = 256 * 1024  # a shard's first request asks for block_size / 8 (at least this), then doubles
# How often the interpreter switches threads in a process that reads URL shards (Python's default is 5 ms): the
# fetcher thread needs the interpreter lock for each chunk it receives, and behind a parsing thread that holds it
# for 5 ms at a time it fell behind (bench/remote_stream.py: 0.68x local per worker at 5 ms, 0.86x at 1 ms).
SWITCH_INTERVAL = 0.001
HANDOFF_LIMIT = 4  # next shards' first blocks kept for their readers in one process (one per mixed set)
_handoff: dict[str, Future] = {}  # url -> Future of (size, first block, retries): fetched ahead of the shard's reader
_handoff_lock = threading.Lock()


def first_block(reads: RemoteReads) -> int:
    """The size of a shard's first request when nothing fetched it ahead: small, so that a reader starts soon; the
    next ones double up to reads.block_size."""
    return min(reads.block_size, max(FIRST_BLOCK_MIN, reads.block_size // 8))


def block_wait(reads: RemoteReads) -> float:
    """The longest a reader waits for a block: each try of its request timing out, with the backoffs between."""
    return (reads.retries + 1) * (reads.timeout + reads.backoff_max) + reads.timeout


class _Requests:
    """Ranged requests of one shard, each retried (not a permanent failure) reads.retries times from the byte where
    it stopped, after bounded exponential backoff; `retried` counts the retries."""

    def __init__(self, url: str, reads: RemoteReads, stop: threading.Event):
        self.url, self.reads, self.stop = url, reads, stop
        self.fs, self.path = url_filesystem(url, reads)
        self.retried = 0

    def _retrying(self, request):
        attempt = 0
        while True:
            try:
                return request()
            except Exception as err:  # reset, timeout, 5xx/429 and short bodies alike: the libraries' own types
                if is_permanent(err) or attempt >= self.reads.retries or self.stop.is_set():
                    err.attempts = attempt
                    raise
                self.stop.wait(retry_delay(self.reads, attempt))
                attempt += 1
                self.retried += 1

    def size(self) -> int:
        return int(self._retrying(lambda: self.fs.size(self.path)))

    def block(self, start: int, end: int) -> bytes:
        parts: list[bytes] = []

        def request() -> bytes:
            done = sum(len(p) for p in parts)
            parts.append(self.fs.cat_file(self.path, start=start + done, end=end))
            if done + len(parts[-1]) != end - start:
                raise OSError(f"body cut short: {done + len(parts[-1])} of {end - start} bytes at byte {start}")
            return parts[0] if len(parts) == 1 else b"".join(parts)  # one piece (the usual case) is not copied
        return self._retrying(request)


def _prefetch(url: str, reads: RemoteReads) -> None:
    """Fetch the size and first block of shard `url` for the RetryingShard that will read it (through _handoff)."""
    future: Future = Future()
    with _handoff_lock:
        if url in _handoff:
            return
        while len(_handoff) >= HANDOFF_LIMIT:
            _handoff.pop(next(iter(_handoff)))
        _handoff[url] = future
    try:
        requests = _Requests(url, reads, threading.Event())
        size = requests.size()
        # a whole block: fetched while the current shard is read, so no reader waits for its small first request
        future.set_result((size, requests.block(0, min(size, reads.block_size)), requests.retried))
    except Exception as err:  # its reader fetches the shard itself, with its own retries
        future.set_exception(err)


class _Fetcher(threading.Thread):
    """Fetches one shard's blocks from byte `start` on, in order, into a bounded queue (at most AHEAD_BLOCKS ahead
    of the reader); after the last one, the next shard's first block (`_prefetch`). A failure after its retries is
    put in the queue for the reader to raise. Every wait is bounded; `stop` ends it after its current request."""

    def __init__(self, url: str, reads: RemoteReads, size: int, start: int, next_url: str | None):
        super().__init__(daemon=True, name="shard-readahead")
        self.stop = threading.Event()
        self.requests = _Requests(url, reads, self.stop)
        self.blocks: queue.Queue = queue.Queue(AHEAD_BLOCKS)
        self.reads, self.size, self.start_at, self.next_url = reads, size, start, next_url
        self.fetched = 0

    def run(self) -> None:
        pos, length = self.start_at, first_block(self.reads) if self.start_at == 0 else self.reads.block_size
        while pos < self.size and not self.stop.is_set():
            end = min(self.size, pos + length)
            length = min(self.reads.block_size, 2 * length)
            try:
                data = self.requests.block(pos, end)
            except Exception as err:  # after its retries: the reader raises it
                self._put((pos, err))
                return
            self.fetched += len(data)
            if not self._put((pos, data)):
                return
            pos = end
        if pos >= self.size and self.next_url:
            _prefetch(self.next_url, self.reads)

    def _put(self, item) -> bool:
        deadline = time.monotonic() + block_wait(self.reads)  # a reader that takes nothing for that long is gone
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.blocks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False


class RetryingShard:
    """A shard at a URL as a seekable binary file (what the tar reader needs: seek, tell, read). A thread fetches
    the shard in ranged requests (first_block, doubling up to reads.block_size), in order, up to AHEAD_BLOCKS ahead
    of the reader, so fetching overlaps parsing; when it has fetched the last block it fetches `next_url`'s first
    block (the shard the stream reads next), which that shard's RetryingShard takes instead of asking for it. A
    request that fails (reset, timeout, 5xx/429, a body cut short) is retried from the byte where it stopped, after
    a backoff; after reads.retries a read raises ShardUnreachableError naming the URL. A seek outside the block in
    hand and the next one starts fetching again from there. Every wait is bounded (block_wait). `fetched`: the
    bytes requested from the store."""

    def __init__(self, url: str, reads: RemoteReads, next_url: str | None = None):
        self.url, self.reads, self.next_url = url, reads, next_url
        self.pos = 0
        self.size = -1
        self.block, self.block_start = b"", 0  # the block in hand
        self.fetcher: _Fetcher | None = None
        self.fetchers: list[_Fetcher] = []
        self.handed = [0, 0]  # bytes and retries of the first block fetched ahead (and of the size request)

    @property
    def fetched(self) -> int:
        return self.handed[0] + sum(f.fetched for f in self.fetchers)

    @property
    def retried(self) -> int:
        return self.handed[1] + sum(f.requests.retried for f in self.fetchers)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("RetryingShard seeks from the start only")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        at = self.pos - self.block_start
        if n >= 0 and 0 <= at and at + n <= len(self.block):  # the common case: inside the block in hand
            self.pos += n
            return self.block[at:at + n]
        if self.size < 0:
            self._begin()
        end = self.size if n < 0 else min(self.size, self.pos + n)
        out = []
        while self.pos < end:
            at = self.pos - self.block_start
            if 0 <= at < len(self.block):
                part = self.block[at:at + end - self.pos]
                out.append(part)
                self.pos += len(part)
            else:
                self._next_block()
        return b"".join(out)

    def _fail(self, err: Exception) -> ShardUnreachableError:
        return ShardUnreachableError(redact_url(f"{self.url}: {type(err).__name__}: {err} (at byte {self.pos}, after "
                                                f"{getattr(err, 'attempts', 0)} retries)", self.url))

    def _begin(self) -> None:
        """The shard's size, and its first block when the previous shard's fetcher fetched it ahead."""
        with _handoff_lock:
            ahead = _handoff.pop(self.url, None)
        if ahead is not None:
            try:
                self.size, first, self.handed[1] = ahead.result(timeout=block_wait(self.reads))
                self.handed[0] = len(first)
                if self.pos == 0:  # not a resumed position further in
                    self.block, self.block_start = first, 0
                    self._start(len(first))
                    return
                self.block, self.block_start = b"", self.pos
                self._start(self.pos)
                return
            except Exception:  # noqa: BLE001 - failed or late: fetched again below, with this reader's retries
                pass
        requests = _Requests(self.url, self.reads, threading.Event())
        try:
            self.size = requests.size()
        except Exception as err:
            raise self._fail(err) from err
        finally:
            self.handed[1] += requests.retried
        self.block, self.block_start = b"", self.pos
        self._start(self.pos)

    def _start(self, start: int) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)  # this process reads URL shards: see SWITCH_INTERVAL
        self._stop()
        self.fetcher = _Fetcher(self.url, self.reads, self.size, start, self.next_url)
        self.fetchers.append(self.fetcher)
        self.fetcher.start()

    def _next_block(self) -> None:
        """Make the block in hand the one holding self.pos: the fetcher's next one, or fetched from there anew."""
        following = self.block_start + len(self.block)
        if self.fetcher is None or not following <= self.pos < following + self.reads.block_size:
            self.block, self.block_start = b"", self.pos
            self._start(self.pos)
        try:
            start, data = self.fetcher.blocks.get(timeout=block_wait(self.reads))
        except queue.Empty:
            self._stop()
            raise self._fail(TimeoutError(f"no block in {block_wait(self.reads):g} s")) from None
        if isinstance(data, Exception):
            self._stop()
            raise self._fail(data) from data
        self.block, self.block_start = data, start

    def _stop(self) -> None:
        if self.fetcher is not None:
            self.fetcher.stop.set()  # it ends after its current request (bounded by reads.timeout); not waited for
            self.fetcher = None

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> "RetryingShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipeShard:
    """A `pipe:COMMAND` shard as the file the tar reader needs: read, tell, and seek (forward: the bytes in between
    are read and dropped; back: the command runs again from the start). Each wait for the command's bytes is
    bounded by reads.timeout; a command that fails (exits non-zero, is silent past the timeout) runs again after a
    backoff, read up to where the reader stopped, reads.retries times; then ShardUnreachableError naming it.
    `fetched`: the bytes the command wrote (what a seek or a resume cost)."""

    def __init__(self, url: str, reads: RemoteReads):
        self.url, self.command, self.reads = url, url[len(PIPE):], reads
        self.proc: subprocess.Popen | None = None
        self.errors = None  # the command's stderr, in a file (a pipe could fill and stall it)
        self.pos = 0  # where the reader is
        self.taken = 0  # bytes taken from the command's stdout (this run of it)
        self.buf = bytearray()  # bytes [taken - len(buf), taken) of this run
        self.done = False
        self.fetched = 0
        self.retried = 0

    def _start(self) -> None:
        self._stop()
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, stderr=self.errors)
        self.taken, self.buf, self.done = 0, bytearray(), False

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()  # read no further than needed (a resumed stream's buffer, an early close)
            proc.stdout.close()
            try:
                proc.wait(timeout=self.reads.timeout)
            except subprocess.TimeoutExpired:
                pass  # killed: the kernel reaps it; nothing here waits without a bound
        if self.errors is not None:
            self.errors.close()
            self.errors = None

    def _chunk(self) -> bytes:
        """The command's next bytes; b"" once it has ended well (exit 0)."""
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.reads.timeout)[0]:
            raise TimeoutError(f"no byte from the command in {self.reads.timeout:g} s (data.shard_timeout)")
        data = os.read(fd, PIPE_CHUNK)
        if data:
            self.taken += len(data)
            self.fetched += len(data)
            return data
        try:
            code = self.proc.wait(timeout=self.reads.timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"the command closed its output but did not end in {self.reads.timeout:g} s") from err
        if code != 0:
            self.errors.seek(0)
            said = " ".join(self.errors.read()[-400:].decode("utf-8", "replace").split())
            raise OSError(f"the command exited with status {code}" + (f": {said}" if said else ""))
        self.done = True
        return b""

    def _read_to(self, end: int | None) -> bytes:
        if self.proc is None or self.pos < self.taken - len(self.buf):
            self._start()  # first read, or a seek back: from the start again
        while not self.done and (end is None or self.taken < end):
            del self.buf[:max(0, min(len(self.buf), self.pos - (self.taken - len(self.buf))))]  # before the reader
            self.buf += self._chunk()
        start = self.taken - len(self.buf)
        low = max(0, self.pos - start)
        out = bytes(self.buf[low:] if end is None else self.buf[low:max(low, end - start)])
        self.pos += len(out)
        return out

    def read(self, n: int = -1) -> bytes:
        attempt = 0
        while True:
            try:
                return self._read_to(None if n < 0 else self.pos + n)
            except Exception as err:  # a failed command, a timeout, a broken pipe
                self._stop()
                if attempt >= self.reads.retries:
                    raise ShardUnreachableError(redact_url(f"{self.url}: {type(err).__name__}: {err} (at byte "
                                                           f"{self.pos}, after {attempt} retries)", self.url)) from err
                time.sleep(retry_delay(self.reads, attempt))
                attempt += 1
                self.retried += 1

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("PipeShard seeks from the start only")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> "PipeShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, reads: RemoteReads | None = None, next_url: str | None = None):
    """A shard as a seekable binary file: the local file as it always was, a URL through RetryingShard (next_url:
    the shard read after it, whose first block is fetched while this one is read), a `pipe:COMMAND` through
    PipeShard (forward only)."""
    if is_pipe(url):
        return PipeShard(url, reads or RemoteReads())
    return RetryingShard(url, reads or RemoteReads(), next_url) if is_url(url) else open(url, "rb")


def merged_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) runs covering (offset, length) spans, touching or overlapping spans merged into one."""
    runs: list[list[int]] = []
    for offset, length in sorted(spans):
        if runs and offset <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], offset + length)
        else:
            runs.append([offset, offset + length])
    return [(start, end) for start, end in runs]


def read_ranges(url: str, spans: list[tuple[int, int]], reads: RemoteReads | None = None) -> list[bytes]:
    """The bytes of (offset, length) spans of one shard: locally by seeking, at a URL as concurrent ranged
    requests (fsspec's cat_ranges) of the merged spans, retried like a shard's reads; of a `pipe:` shard by running
    its command once and reading it from its start up to the last span (pipe_cost says how many bytes that is)."""
    if is_pipe(url):
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        got: dict[int, bytes] = {}
        with PipeShard(url, reads or RemoteReads()) as f:
            for i in order:
                f.seek(spans[i][0])
                got[i] = f.read(spans[i][1])
        return [got[i] for i in range(len(spans))]
    if not is_url(url):
        out = []
        with open(url, "rb") as f:
            for offset, length in spans:
                f.seek(offset)
                out.append(f.read(length))
        return out
    reads = reads or RemoteReads()
    runs = merged_spans(spans)
    fs, path = url_filesystem(url, reads)

    def request() -> list[bytes]:
        blobs = fs.cat_ranges([path] * len(runs), [a for a, _ in runs], [b for _, b in runs], on_error="return")
        for blob, (start, end) in zip(blobs, runs):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != end - start:
                raise OSError(f"body cut short: {len(blob)} of {end - start} bytes at byte {start}")
        return blobs

    blobs = with_retries(url, reads, request)
    starts = [a for a, _ in runs]
    out = []
    for offset, length in spans:
        i = bisect.bisect_right(starts, offset) - 1
        out.append(blobs[i][offset - starts[i]:offset - starts[i] + length])
    return out


def pipe_cost(spans: list[tuple[int, int]]) -> int:
    """Bytes a `pipe:` shard's command writes before read_ranges has `spans`: all of it up to the last one."""
    return max((offset + length for offset, length in spans), default=0)


def read_text(location: str | Path) -> str:
    """A small file of a shard set, local or at a URL."""
    return read_url(location).decode() if is_url(location) else Path(location).read_text()


def read_bytes(location: str | Path) -> bytes:
    """A small file of a shard set, local or at a URL, byte for byte."""
    return read_url(location) if is_url(location) else Path(location).read_bytes()


def file_size(location: str | Path, reads: RemoteReads | None = None) -> int:
    """A shard's size in bytes, local or at a URL (one HEAD / stat request); a missing one raises
    FileNotFoundError (locally also a folder: it is no shard)."""
    if not is_url(location):
        if Path(location).is_dir():
            raise FileNotFoundError(f"{location} is a folder, not a shard")
        return Path(location).stat().st_size
    reads = reads or RemoteReads()
    fs, path = url_filesystem(location, reads)
    try:
        return int(with_retries(location, reads, lambda: fs.size(path)))
    except ShardUnreachableError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            raise err.__cause__ from None
        raise


def list_names(root: str | Path, suffix: str) -> list[str] | None:
    """Names of the files directly in a shard-set folder ending in `suffix`; None where the store cannot list a
    folder (an HTTP server without an index page): what is not listed there is not looked for."""
    if not is_url(root):
        return sorted(p.name for p in Path(root).glob(f"*{suffix}"))
    fs, path = url_filesystem(root)
    try:
        entries = fs.ls(path, detail=False)
    except Exception:  # noqa: BLE001 - 404 for a folder, no listing permission: the check goes on without it
        return None
    return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries if str(e).endswith(suffix)})


# The first bytes of the compressed files tarfile.open would read transparently, which the trainer cannot read:
# it seeks to byte offsets inside plain tars (docs/design.md section 3).
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def not_a_plain_tar(path: Path | SetRoot) -> str | None:
    """Why the file at `path` (local or a URL) is not a plain tar the trainer can read (an empty file, a
    compressed one), or None."""
    with open_shard(path) as f:
        head = f.read(8)
    if not head:
        return "it is empty (0 bytes), not a tar; rebuild the shard set or remove the file from manifest.json"
    for magic, kind in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return (f"it is {kind}-compressed; shards must be plain tars (the trainer seeks into them): decompress "
                    "it under the same name, or rebuild the shard set")
    return None
