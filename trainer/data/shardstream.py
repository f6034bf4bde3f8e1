"""One worker's endless stream of raw (undecoded) training samples whose position can be saved and restored.

    shard source (resampled with replacement, or one deterministic pass after another, split by rank then worker)
    -> tar members grouped into raw samples, each with where its bytes lie in its tar
    -> shuffle buffer of raw samples, filled once and kept for the whole run (epochs are only a count above)

Everything here is written by hand, not taken from webdataset, because exact resume needs what webdataset's pieces
keep inside their generators: `ResampledShards` and `split_by_node`/`split_by_worker` cannot be put back at shard k
without replaying k draws (and read the rank from the environment, where the benchmark simulates a thousand
ranks in one process), `tarfile_to_samples` does not say where a sample lies in its tar, and `shuffle` cannot give
up its buffer. With those three things known the position of a worker is small (RNG state, shard position and byte
offset, the buffer as (shard, offset, length) references) and getting back to it costs one read of the buffer's
bytes plus at most one member header, whatever the run's length (`restore`).
Shards must be plain (uncompressed) tar files, as `python -m shards build` writes them: a byte offset into a
compressed tar cannot be sought. A shard may be a local file or a URL that can seek (HTTP Range, S3 ranged GET):
`trainer.data.shardset.open_shard` reads it sequentially in large blocks, and a resume asks for the buffer's byte
ranges and continues the current shard at its offset exactly as on local disk. A `pipe:COMMAND` shard cannot
seek: a resume runs its command again, reads it from its start and drops the bytes before the saved sample (its
buffered samples likewise); the log says so and the restore cost counts every byte read.
"""
from __future__ import annotations

import io
import logging
import os
import random
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from webdataset.tariterators import base_plus_ext

from shards.remote import RemoteReads, is_pipe, is_url, open_shard, pipe_cost, read_ranges, redact_url
from trainer.data.samples import TooManyBadSamples

BLOCK = 512
log = logging.getLogger(__name__)


class TruncatedTar(OSError):  # noqa: N818 (named for what the shard is, like the sample kinds)
    """A tar cut off inside a header or a member: the rest of that shard is lost."""


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("LEN path=NAME\\n" records), if any."""
    pos = 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _shrunk(f, offset: int) -> bool:
    """Whether the local shard file `f` now ends before `offset`: emptied or cut while it was read (a URL or a
    pipe cannot say; their reads fail on their own)."""
    return isinstance(f, io.BufferedReader) and os.fstat(f.fileno()).st_size < offset


def read_members(f, offset: int) -> Iterator[tuple[int, int, str, bytes]]:
    """(start, end, name, data) of every regular-file member of the open tar `f` from byte `offset` on; `start` is
    where the member's first header (long-name and pax headers included) begins, so reading can restart there, and
    `end` where its padded data ends."""
    long_name = None
    start = first = offset
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if not header and (offset == first or _shrunk(f, offset)):  # a tar holds at least its closing blocks
            raise TruncatedTar("empty shard (0 bytes)" if offset == 0 else f"shard ends before byte {offset}, "
                               f"where its next sample was to be read (emptied or cut shorter while the run read it)")
        if not header or header == bytes(BLOCK):
            return  # end of archive (or a tar written without its closing blocks)
        if len(header) < BLOCK:
            raise TruncatedTar(f"tar cut off inside a header at byte {offset}")
        try:
            info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as e:
            raise TruncatedTar(f"unreadable tar header at byte {offset}: {e}") from e
        has_data = info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE)
        data = f.read(info.size) if has_data else b""
        if len(data) < (info.size if has_data else 0):
            raise TruncatedTar(f"tar cut off inside member {info.name} at byte {offset}")
        offset += BLOCK + _padded(info.size)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            yield start, offset, long_name or info.name, data
            long_name, start = None, offset
        else:  # directories, links, global pax headers: not sample members
            long_name, start = None, offset


class Ref(NamedTuple):
    """Where a raw sample's bytes lie: shard set, url index in that set, byte offset of its first member's header,
    length up to the end of its last member. A tuple: a worker's state lists thousands at every batch."""

    set: int
    url: int
    offset: int
    length: int


def _group(members: Iterator[tuple[int, int, str, bytes]], url: str) -> Iterator[tuple[dict, int, int]]:
    """Raw samples (webdataset's layout: __key__, __url__, one entry per extension) with their byte span, from
    consecutive members sharing a key (webdataset's base_plus_ext split). At a cut-off member the sample being
    grouped is still handed on, then the error raised (as webdataset's group_by_keys does)."""
    sample, begin, end = None, 0, 0
    try:
        for start, stop, name, data in members:
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue  # webdataset's metadata members
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if sample is not None and key != sample["__key__"]:
                yield sample, begin, end
                sample = None
            if sample is None:
                sample, begin = {"__key__": key, "__url__": url}, start
            sample[ext.lower()] = data
            end = stop
    except TruncatedTar:
        if sample is not None:
            yield sample, begin, end
        raise
    if sample is not None:
        yield sample, begin, end


@dataclass
class Cursor:
    """A shard set's place in its shard sequence: for one pass, (pass, index into this worker's share); the shard
    being read (url index, -1 = none) and the byte offset of its next sample."""

    pass_: int = 0
    index: int = 0
    url: int = -1
    offset: int = 0


@dataclass
class Identity:
    """Who reads: rank of world, worker of workers, and the run's seed."""

    rank: int
    world: int
    worker: int
    workers: int
    seed: int


@dataclass
class StreamState:
    """What a worker needs to continue its stream exactly: all plain values (saved with torch.save)."""

    rng: tuple
    cursors: list[list[int]]
    buffer: list[tuple]
    batches: int = 0

    def to_dict(self) -> dict:
        return {"rng": self.rng, "cursors": self.cursors, "buffer": [tuple(r) for r in self.buffer],
                "batches": self.batches}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        version, internal, gauss = d["rng"]
        return cls((version, tuple(internal), gauss), [list(c) for c in d["cursors"]],
                   [tuple(b) for b in d["buffer"]], int(d["batches"]))


@dataclass
class RestoreCost:
    bytes: int = 0
    seconds: float = 0.0
    samples: int = 0


@dataclass
class RawStream:
    """One worker's raw samples of one or more shard sets (mixed by sample weight), shuffled through a buffer
    kept across epochs. `handler(exn, url)` is told of a shard that cannot be opened or is cut off (and goes on).
    passes: stop after this many passes over the shards in one-pass mode (None: endless); resampled streams are
    endless. reads: how shards at a URL are read (block size, timeouts, retries). Iterate `samples()` once;
    `state()` is its position after the last sample it yielded."""

    set_urls: list[list[str]]
    set_weights: list[float]
    resampled: bool
    shuffle_buffer: int
    who: Identity
    handler: Callable[[Exception, str | None], bool]
    on_shard: Callable[[], None] = lambda: None
    passes: int | None = None
    start_pass: int = 0
    reads: RemoteReads = field(default_factory=RemoteReads)
    rng: random.Random = field(init=False)
    cursors: list[Cursor] = field(init=False)
    buffer: list[tuple[Ref, dict]] = field(init=False, default_factory=list)
    cost: RestoreCost = field(init=False, default_factory=RestoreCost)
    read: int = field(init=False, default=0)  # raw samples taken from shards (restored buffer not included)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.who.seed}-{self.start_pass}-{self.who.rank}-{self.who.worker}")
        self.cursors = [Cursor(pass_=self.start_pass) for _ in self.set_urls]

    # ------------------------------------------------------------------------------------------ position
    def state(self, batches: int = 0) -> StreamState:
        return StreamState(self.rng.getstate(), [[c.pass_, c.index, c.url, c.offset] for c in self.cursors],
                           [ref for ref, _ in self.buffer], batches)

    def restore(self, state: StreamState) -> RestoreCost:
        """Put the stream where `state` was taken: RNG and cursors set, the buffer's samples re-read from their
        byte ranges (the only bytes read again; the current shard goes on from its offset). A shard at a URL is
        asked for all its ranges at once (concurrent ranged requests), so a resume costs round trips per shard,
        not per sample."""
        start = time.perf_counter()
        self.rng.setstate(state.rng)
        self.cursors = [Cursor(*c) for c in state.cursors]
        refs = [Ref(*b) for b in state.buffer]
        by_shard: dict[tuple[int, int], list[int]] = {}
        for i, ref in enumerate(refs):
            by_shard.setdefault((ref.set, ref.url), []).append(i)
        loaded: dict[int, dict] = {}
        for (set_index, url_index), indices in sorted(by_shard.items()):
            url = self.set_urls[set_index][url_index]
            spans = [(refs[i].offset, refs[i].length) for i in indices]
            try:
                chunks = read_ranges(url, spans, self.reads)
                samples = [next(_group(read_members(io.BytesIO(chunk), 0), url))[0] for chunk in chunks]
            except Exception as exn:  # a shard emptied or cut since the state was saved: its samples are skipped
                self.handler(exn, url)  # and counted, as a shard cut while read
                continue
            if is_pipe(url):  # read from its start up to the last span: count the bytes in between too
                self.cost.bytes += pipe_cost(spans) - sum(len(chunk) for chunk in chunks)
                log.info("%s cannot seek: its %d buffered samples were re-read from its start (%d bytes)",
                         redact_url(url), len(spans), pipe_cost(spans))
            for i, chunk, sample in zip(indices, chunks, samples):
                self.cost.bytes += len(chunk)  # a sample's byte range is a small tar of its own members
                loaded[i] = sample
        self.buffer = [(refs[i], loaded[i]) for i in range(len(refs)) if i in loaded]
        self.cost.samples = len(refs)
        self.cost.seconds = time.perf_counter() - start
        return self.cost

    # ------------------------------------------------------------------------------------------ shards
    def _share(self, set_index: int, pass_: int) -> list[int]:
        """One pass: every rank shuffles the shard list identically (seeded by the pass), then takes its own disjoint
        share, then the worker its share of that (what webdataset's split_by_node + split_by_worker do)."""
        order = list(range(len(self.set_urls[set_index])))
        random.Random(f"{self.who.seed}-{pass_}").shuffle(order)
        return order[self.who.rank :: self.who.world][self.who.worker :: self.who.workers]

    def _next_shard(self, set_index: int) -> bool:
        """Move the set's cursor to its next shard; False when one-pass mode has done its passes."""
        c = self.cursors[set_index]
        if self.resampled:
            c.url = self.rng.randrange(len(self.set_urls[set_index]))
        else:
            share = self._share(set_index, c.pass_)
            if not share and self.passes is None:  # endless, it would spin; check_shards_for_workers refuses it first
                raise ValueError(f"worker {self.who.worker} of rank {self.who.rank} has no shard of its own "
                                 f"({len(self.set_urls[set_index])} shards for {self.who.world} ranks x "
                                 f"{self.who.workers} workers)")
            while c.index >= len(share):
                c.pass_, c.index = c.pass_ + 1, 0
                if self.passes is not None and c.pass_ >= self.start_pass + self.passes:
                    return False
                share = self._share(set_index, c.pass_)
            c.url, c.index = share[c.index], c.index + 1
        c.offset = 0
        self.on_shard()
        return True

    def _peek_next(self, set_index: int) -> str | None:
        """The shard the set's cursor moves to after its current one (a URL shard's reader fetches its first block
        ahead); None where that is drawn at random (resampled) or there is none."""
        c = self.cursors[set_index]
        if self.resampled:
            return None
        pass_, index, share = c.pass_, c.index, self._share(set_index, c.pass_)
        if index >= len(share):
            pass_, index = pass_ + 1, 0
            if self.passes is not None and pass_ >= self.start_pass + self.passes:
                return None
            share = self._share(set_index, pass_)
        return self.set_urls[set_index][share[index]] if index < len(share) else None

    def _set_samples(self, set_index: int) -> Iterator[tuple[Ref, dict]]:
        """Raw samples of one set, shard after shard from its cursor; a shard that holds none in a row of too many
        means the set cannot be read at all (an endless loop otherwise)."""
        empty_in_a_row = 0
        urls = self.set_urls[set_index]
        while True:
            c = self.cursors[set_index]
            if c.url < 0 and not self._next_shard(set_index):
                return
            url, got = urls[c.url], 0
            if c.offset and is_pipe(url):  # a resumed position in a shard that cannot seek
                self.cost.bytes += c.offset
                log.info("%s cannot seek: re-reading it from its start, %d bytes to skip to the saved sample",
                         redact_url(url), c.offset)
            try:
                with open_shard(url, self.reads, self._peek_next(set_index) if is_url(url) else None) as f:
                    for sample, begin, end in _group(read_members(f, c.offset), url):
                        # _group hands a sample on only after reading the next one's first member; the cursor is
                        # set to where that member begins, so a state taken now re-reads it from there.
                        c.offset = end
                        got += 1
                        self.read += 1
                        yield Ref(set_index, c.url, begin, end - begin), sample
            except Exception as exn:  # a missing, unreadable or cut-off shard: counted, the next shard follows
                self.handler(exn, url)
            c.url, c.offset = -1, 0
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(urls) + 10:
                raise TooManyBadSamples(f"no sample could be read from {empty_in_a_row} shards in a row of "
                                        f"{redact_url(urls[0])} ...: every shard is empty or unreadable; check the "
                                        f"set with `python -m shards check` and rebuild it")

    def _raw(self) -> Iterator[tuple[Ref, dict]]:
        """Samples of the sets, each drawn from set i with probability set_weights[i] (a per-sample choice: a
        per-shard one would weight sets by their shard sizes)."""
        if len(self.set_urls) == 1:
            yield from self._set_samples(0)
            return
        sets = range(len(self.set_urls))
        streams = [self._set_samples(i) for i in sets]
        while True:
            got = next(streams[self.rng.choices(sets, weights=self.set_weights)[0]], None)
            if got is None:
                return
            yield got

    def samples(self) -> Iterator[dict]:
        """Raw samples through the shuffle buffer. The buffer is filled once (at the stream's start, or re-read by
        restore) and then swaps one sample in for each one out, for as long as the stream runs."""
        for ref, sample in self._raw():
            if len(self.buffer) < self.shuffle_buffer:
                self.buffer.append((ref, sample))
                continue
            slot = self.rng.randrange(len(self.buffer))
            out = self.buffer[slot][1]
            self.buffer[slot] = (ref, sample)
            yield out
        self.rng.shuffle(self.buffer)  # a finite stream (one-pass mode with passes) drains its buffer
        while self.buffer:
            yield self.buffer.pop()[1]
