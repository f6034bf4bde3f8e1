"""A shard set as the trainer reads it (through its documented format, defined once in `shards.format`:
`manifest.json`, `concepts.json`, `vocab.json` and tars of `{image_id}.{jpg,jpeg,png,webp,npy}` + `{image_id}.json`),
in a local folder or at a URL, mixing several sets for training, the check that every loader worker gets a shard,
and the stable hash that lets string image ids travel in tensors.

Where a set lives: a local folder, or a URL of any fsspec protocol whose package is installed (`s3://bucket/prefix`
through s3fs, `http(s)://host/prefix` through aiohttp, `gs://` through gcsfs, ...). A URL set's small files are read
once when it is opened; its shards are never copied to disk: `open_shard` gives a seekable file that reads ranged
requests of `RemoteReads.block_size` bytes with read-ahead (HTTP Range, S3 ranged GET), each with a timeout, a
failed read retried from the byte where it stopped. Credentials come from where the protocol's library looks
(for S3: the environment, ~/.aws, an instance role; the endpoint from AWS_ENDPOINT_URL), never from the config.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from shards.format import CONCEPTS, MANIFEST, VOCAB, is_manifest
from trainer.data.text import Vocab

URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    """Whether a shard-set location or shard names a URL (`scheme://...`) rather than a local path."""
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


class SetRoot(str):
    """A URL shard-set root that joins names like a Path does (`root / "manifest.json"`), keeping its `//`."""

    def __truediv__(self, name: str) -> "SetRoot":
        return SetRoot(f"{self.rstrip('/')}/{name}")


@dataclass(frozen=True)
class RemoteReads:
    """How shards at a URL are read: sequential ranged requests of block_size bytes, the next one fetched as the
    reader reaches it (fsspec's read-ahead cache), each request bounded by `timeout` seconds; a failed request
    (connection reset, timeout, 5xx/429, a body cut short) is retried `retries` times from the byte where the read
    stopped, after backoff, 2 x backoff, ... seconds (at most backoff_max)."""

    block_size: int = 8 * 2**20
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 10.0


class ShardUnreachable(OSError):
    """A shard at a URL that could not be read after its retries. `kind` names its bad-sample kind."""

    kind = "unreachable_shard"


def storage_options(url: str, reads: RemoteReads) -> dict:
    """fsspec options for a URL's protocol: every request with a timeout; S3's endpoint from AWS_ENDPOINT_URL(_S3).
    Retries are ours (RetryingShard), so the libraries' own are kept short."""
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        import aiohttp  # lazy: only HTTP shard sets need it (fsspec's HTTP filesystem is built on it)
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=reads.timeout,
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
    if url.lower().startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default"
        reason += f" (endpoint {endpoint}; credentials: {s3_credential_source()})"
    return " ".join(reason.split())  # one line: library messages may hold newlines


def access_error(url: str, err: Exception) -> str:
    """One line on why `url` could not be read (access_detail)."""
    return f"cannot read {url}: {access_detail(url, err)}"


def retry_delay(reads: RemoteReads, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based): bounded exponential backoff."""
    return min(reads.backoff * 2**attempt, reads.backoff_max)


def is_permanent(err: Exception) -> bool:
    """A missing file or a refused credential: retrying cannot make it work."""
    return isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError))


def with_retries(url: str, reads: RemoteReads, request):
    """request() retried on any failure but a permanent one, reads.retries times after bounded exponential
    backoff; then ShardUnreachable naming the URL."""
    attempt = 0
    while True:
        try:
            return request()
        except Exception as err:  # fsspec's protocols raise their libraries' own errors (aiohttp, botocore)
            if is_permanent(err) or attempt >= reads.retries:
                raise ShardUnreachable(f"{url}: {type(err).__name__}: {err} (after {attempt} retries)") from err
            time.sleep(retry_delay(reads, attempt))
            attempt += 1


def read_url(url: str, reads: RemoteReads | None = None) -> bytes:
    """A small file at a URL, whole (manifest, vocabularies); a missing one raises FileNotFoundError."""
    reads = reads or RemoteReads()
    fs, path = url_filesystem(url, reads)
    try:
        return with_retries(url, reads, lambda: fs.cat_file(path))
    except ShardUnreachable as err:
        if is_permanent(err.__cause__):
            raise err.__cause__ from None
        raise


class RetryingShard:
    """A shard at a URL as a seekable binary file (what the tar reader needs: seek, tell, read). Reads go through an
    fsspec file with a read-ahead cache of reads.block_size; a read that fails (or comes back shorter than the
    shard says it is) is retried from the byte where it stopped on a freshly opened file, after a backoff; after
    reads.retries it raises ShardUnreachable naming the URL. `fetched` counts the bytes requested from the store."""

    def __init__(self, url: str, reads: RemoteReads):
        self.url = url
        self.reads = reads
        self.pos = 0
        self.fetched = 0
        self.file = None
        self.size = -1
        self.retried = 0

    def _open(self) -> None:
        fs, path = url_filesystem(self.url, self.reads)
        self.file = fs.open(path, "rb", block_size=self.reads.block_size, cache_type="readahead")
        self.size = self.file.size

    def _drop(self) -> None:
        if self.file is not None:
            self.fetched += getattr(self.file.cache, "total_requested_bytes", 0)
            file, self.file = self.file, None
            try:
                file.close()
            except Exception:  # closing a broken connection may fail too; it is dropped either way
                pass

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("RetryingShard seeks from the start only")
        self.pos = offset
        return offset

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        out, attempt = b"", 0
        while True:
            try:
                if self.file is None:
                    self._open()
                want = self.size - self.pos if n < 0 else min(n - len(out), self.size - self.pos)
                self.file.seek(self.pos)
                part = self.file.read(want) if want > 0 else b""
                out, self.pos = out + part, self.pos + len(part)
                if len(part) == want:
                    return out
                raise OSError(f"body cut short: {len(part)} of {want} bytes at byte {self.pos - len(part)}")
            except Exception as err:  # reset, timeout, 5xx/429 and short bodies alike: the libraries' own types
                self._drop()
                if is_permanent(err) or attempt >= self.reads.retries:
                    raise ShardUnreachable(f"{self.url}: {type(err).__name__}: {err} (at byte {self.pos}, "
                                           f"after {attempt} retries)") from err
                time.sleep(retry_delay(self.reads, attempt))
                attempt += 1
                self.retried += 1

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "RetryingShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, reads: RemoteReads | None = None):
    """A shard as a seekable binary file: the local file as it always was, a URL through RetryingShard."""
    return RetryingShard(url, reads or RemoteReads()) if is_url(url) else open(url, "rb")


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
    requests (fsspec's cat_ranges) of the merged spans, retried like a shard's reads."""
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


def use_fsspec_for_webdataset() -> None:
    """webdataset's readers (evaluation, the first-sample check) open URLs through its `gopen_schemes` table, which
    has curl for http(s) and nothing for s3: every fsspec protocol is routed to open_shard instead, so all reads of
    a URL shard set share one client, its credentials, timeouts and retries. `pipe:` keeps webdataset's own."""
    from webdataset.gopen import gopen_schemes  # lazy: webdataset pulls in torch; only URL sets need this

    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        if mode != "rb":
            raise ValueError(f"{url}: shard sets at a URL are read-only here")
        return open_shard(url)

    import fsspec  # lazy: see url_filesystem
    for protocol in fsspec.available_protocols():
        if protocol not in ("pipe", "file", "local"):
            gopen_schemes[protocol] = gopen_fsspec


def read_text(location: str | Path) -> str:
    """A small file of a shard set, local or at a URL."""
    return read_url(location).decode() if is_url(location) else Path(location).read_text()


def image_id_hash(image_id: str) -> int:
    """A stable 63-bit integer for a string image id, so ids can travel in tensors and be all-gathered."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def set_root(location: str | Path) -> Path | SetRoot:
    """A shard set's root: a local Path, or a SetRoot for a URL (no trailing slash)."""
    return SetRoot(location.rstrip("/")) if is_url(location) else Path(location)


@dataclass
class ShardSet:
    """A shard set, in a local folder or at a URL: its manifest, concept vocabulary and word vocabulary."""

    root: Path | SetRoot
    manifest: dict
    concepts: list[str]
    vocab: Vocab

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        """Reads the set's three small files once (at a URL: one request each; its shards stay where they are)."""
        root = set_root(root)
        if isinstance(root, SetRoot):
            use_fsspec_for_webdataset()
        manifest_path = root / MANIFEST
        try:
            manifest = json.loads(read_text(manifest_path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read shard-set manifest {manifest_path}: {e}") from e
        if not is_manifest(manifest):
            raise ValueError(f"{manifest_path} is not a hier-shards manifest (format/splits missing)")
        concepts_path = root / CONCEPTS
        try:
            entries = json.loads(read_text(concepts_path))["concepts"]
            concepts = [e["lemma"] for e in sorted(entries, key=lambda e: e["id"])]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read concept vocabulary {concepts_path}: {e}") from e
        try:
            vocab = Vocab(json.loads(read_text(root / VOCAB))["words"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read word vocabulary {root / VOCAB}: {e}") from e
        return cls(root, manifest, concepts, vocab)

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def split_info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {self.root / 'manifest.json'}")
        return self.manifest["splits"][split]

    def urls(self, split: str) -> list[str]:
        """The split's shards, local paths or URLs. Local ones must exist; at a URL, asking for each of thousands
        would cost a request per shard: a missing one is counted when it is read (the config check looks for the
        first shard of each split)."""
        urls = [str(self.root / name) for name in self.split_info(split)["shards"]]
        missing = [] if isinstance(self.root, SetRoot) else [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard files listed in {self.root / 'manifest.json'} are missing: {missing[:3]}")
        return urls


def mix_sets(shardset: ShardSet, extra_roots: list[str], weights: list[float],
             split: str) -> list[tuple[ShardSet, float]]:
    """[(shard set, share of the training samples)] for data.mix_shards, `shardset` first; [] without a mix.
    The sets must share one concept and word vocabulary: labels and token ids mean the same in every batch."""
    if not extra_roots:
        return []
    sets = [shardset] + [ShardSet.open(root) for root in extra_roots]
    for extra in sets[1:]:
        for what, file, same in (("concept", "concepts.json", extra.concepts == shardset.concepts),
                                 ("word", "vocab.json", extra.vocab.words == shardset.vocab.words)):
            if not same:
                raise ValueError(f"{extra.root / file}: its {what} vocabulary differs from {shardset.root / file}; "
                                 f"build the set with `python -m shards build ... --vocab-from {shardset.root}`")
    weights = weights or [s.split_info(split)["images"] for s in sets]
    total = float(sum(weights))
    return [(s, w / total) for s, w in zip(sets, weights)]


def check_shards_for_workers(num_shards: int, world_size: int, num_workers: int, split: str) -> None:
    """Without resampling every worker of every rank needs its own shard, or some read nothing."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise ValueError(f"split {split!r} has {num_shards} shards but {world_size} ranks x {max(1, num_workers)} "
                         f"workers need at least {needed}; rebuild with a smaller --shard-size, lower "
                         f"data.num_workers, or use data.resampled=true")
