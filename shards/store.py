"""Where `shards build --out URL` puts a shard set: a store of any fsspec protocol that can write (`s3://bucket/prefix`,
`gs://`, `file://`, ...). The build writes into a local staging folder as it writes a local set (byte for byte the
same files), and `StoreOutput` moves each finished file into the store whole: an object store's PUT (or its
multipart upload, completed at the end) makes an object appear only when all of it is there, so a shard is never
seen half written; other protocols get the file under `NAME.partial` and a rename. The small files follow the
shards, manifest.json last (its presence marks a complete set), the build's options record (build.partial.json)
first, so that `--resume` recognises an interrupted build in the store as it does in a folder: it lists the store,
downloads each finished shard the plan expects (one at a time, into staging), keeps it when it holds exactly its
samples, and writes the rest. Credentials come from where the protocol's library looks (the environment, ~/.aws,
an instance role), never from the command line; a message names the store's URL without any password in it.
"""
from __future__ import annotations

from pathlib import Path

from shards.remote import (
    RemoteReads,
    ShardUnreachableError,
    access_detail,
    is_permanent,
    redact_url,
    url_filesystem,
    with_retries,
)
from shards.writer import PARTIAL_SUFFIX
from usercli import UserError

# protocols whose single PUT (or completed multipart upload) is atomic: the object is written without a temporary
# name (they have no rename: a "move" is a copy of the whole object)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
READ_ONLY = frozenset({"http", "https"})


class StoreError(UserError):
    """A store that cannot be written (missing bucket, refused credentials, a network that keeps failing)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact_url(message), *args)  # a URL's password is never shown (shards.remote.redact_url)


class StoreOutput:
    """A build's --out URL: the names in it, and files moved into it (uploaded whole) or fetched from it."""

    def __init__(self, url: str, reads: RemoteReads | None = None):
        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0].lower()
        if protocol in READ_ONLY:
            raise StoreError(f"--out {redact_url(self.url)}: an http(s) URL cannot be written; build to the store's "
                             "own protocol (s3://bucket/prefix, gs://..., or any fsspec URL that can write)")
        self.reads = reads or RemoteReads()
        try:
            self.fs, self.path = url_filesystem(self.url, self.reads)
        except (ImportError, ValueError) as err:
            raise StoreError(f"--out {redact_url(self.url)}: {type(err).__name__}: {err}") from None
        self.atomic_put = protocol in OBJECT_STORES

    def where(self, name: str = "") -> str:
        """A file's URL for messages (no password in it)."""
        return redact_url(f"{self.url}/{name}" if name else self.url)

    def _call(self, what: str, name: str, request):
        """request() with retries; a failure that stays becomes one line naming the URL and what was tried."""
        try:
            return with_retries(self.where(name), self.reads, request)
        except ShardUnreachableError as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            raise StoreError(f"cannot {what} {self.where(name)}: {access_detail(self.url, cause)}"
                             + ("" if is_permanent(cause) else "; `build ... --resume` continues the build")) from None

    def names(self) -> list[str]:
        """Names of the files directly under the URL; none when nothing is there yet (a missing bucket shows when
        the first file is written)."""
        def listing() -> list[str]:
            try:
                self.fs.invalidate_cache(self.path)
                entries = self.fs.ls(self.path, detail=True)
            except FileNotFoundError:
                return []
            return sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
        return self._call("list", "", listing)

    def folders(self) -> list[str]:
        """Names of what is under the URL and is not a file (a "folder" of keys)."""
        def listing() -> list[str]:
            try:
                entries = self.fs.ls(self.path, detail=True)
            except FileNotFoundError:
                return []
            return sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "file")
        return self._call("list", "", listing)

    def put(self, local: Path, keep: bool = False) -> None:
        """Move a finished local file into the store under its name, whole (see the module docstring); the local
        copy is removed unless keep."""
        target = f"{self.path}/{local.name}"
        if self.atomic_put:
            self._call("write", local.name, lambda: self.fs.put_file(str(local), target))
        else:
            self.fs.makedirs(self.path, exist_ok=True)
            self._call("write", local.name, lambda: self.fs.put_file(str(local), target + PARTIAL_SUFFIX))
            self._call("write", local.name, lambda: self.fs.mv(target + PARTIAL_SUFFIX, target))
        if not keep:
            local.unlink()

    def fetch(self, name: str, local: Path) -> bool:
        """Copy the store's file `name` to `local`; False when there is none."""
        def request() -> bool:
            try:
                self.fs.get_file(f"{self.path}/{name}", str(local))
            except FileNotFoundError:
                local.unlink(missing_ok=True)
                return False
            return True
        return self._call("read", name, request)

    def remove(self, name: str) -> None:
        """Delete the store's file `name` (no error when there is none)."""
        def request() -> None:
            try:
                self.fs.rm_file(f"{self.path}/{name}")
            except FileNotFoundError:
                pass
        self._call("delete", name, request)
