"""The generated bad-input matrix, family `members` (issue 26 part 1): every member kind of a shard set (SET_FILES:
a shard tar, manifest.json, concepts.json, vocab.json; SAMPLE_MEMBERS: a sample's .json and picture inside a good
tar) x DAMAGE (zero bytes, truncated, gzip-compressed under the same name, a folder in its place, a symlink
pointing out of the set) x READERS (`shards check`, `shards stats`, training).

Each damaged set is a copy of the tiny shard set with one thing damaged (the first train shard, or one sample in
it). A reader must:
- for a set file: refuse it with exit 2 and one line naming the file (`shards check`: its documented exit 1 with
  the problem on a line naming the file also counts, as check lists problems rather than stopping at the first);
- for a sample member inside a good tar: `shards check` lists it (exit 1, a line naming the tar and the sample);
  `shards stats` refuses it naming the tar and the sample (exit 2), or for a picture member (stats reads only the
  json) runs through: a documented acceptance; training skips the sample and counts it under a kind of BAD_KINDS
  (never another exception), every other sample still read.

A symlink out of the set is never followed: a set file or shard that links outside the set's folder is refused
naming it (shards.format.refuse_link_out); a symlink member inside a tar is not a file, so its sample lacks that
member and is reported or skipped and counted as such (the link's target is never read).

Training here is its real entry with the cheapest real path: trainer.train's main with train() replaced by the
refusals prepare() makes before any work (bad_input_generated._pre_work_checks), then, for a set it accepts, one
pass of the training stream over the train split (TrainStream with its own bad-sample counter, no model).
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

from bad_input_generated import GenCase, GenResult, _call, _config_argv, judge_refusal

SET_FILES = ("tar", "manifest.json", "concepts.json", "vocab.json")
SAMPLE_MEMBERS = ("json", "png")
DAMAGE = ("zero_bytes", "truncated", "compressed", "folder", "symlink_out")
READERS = ("check", "stats", "train")
STATS_READS_ONLY_JSON = "shards stats reads a sample's json only; a bad picture is for `shards check` (which lists " \
                        "it) and training (which skips and counts it)"


def member_cases() -> list[GenCase]:
    return [GenCase("members", f"members:{reader}:{member}:{damage}", member, damage, reader)
            for member in (*SET_FILES, *SAMPLE_MEMBERS) for damage in DAMAGE for reader in READERS]


def _damage_bytes(damage: str, data: bytes) -> bytes:
    return {"zero_bytes": b"", "truncated": data[: len(data) // 2], "compressed": gzip.compress(data)}[damage]


def damaged_set(shards: Path, member: str, damage: str, d: Path) -> tuple[Path, Path, str]:
    """A copy of `shards` under d with the damage; (set root, the file named in a refusal, the sample key or "")."""
    root = Path(shutil.copytree(shards, d / "set"))
    manifest = json.loads((root / "manifest.json").read_text())
    tar = root / manifest["splits"]["train"]["shards"][0]
    if member in SAMPLE_MEMBERS:
        return root, tar, _damage_member(tar, member, damage, d)
    path = tar if member == "tar" else root / member
    data = path.read_bytes()
    path.unlink()
    if damage == "folder":
        path.mkdir()
        (path / "inside").write_bytes(data)
    elif damage == "symlink_out":  # a valid file, but outside the set: following it would read another set's file
        outside = d / "outside" / path.name
        outside.parent.mkdir()
        outside.write_bytes(data)
        path.symlink_to(outside)
    else:
        path.write_bytes(_damage_bytes(damage, data))
    return root, path, ""


def _damage_member(tar: Path, ext: str, damage: str, d: Path) -> str:
    """The tar rewritten with the `ext` member of its second sample damaged; returns that sample's key."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    key = keys[1]
    (d / "outside.txt").write_text("a file outside the shard set")
    with tarfile.open(tar, "w") as out:
        for info, data in members:
            if info.name != f"{key}.{ext}":
                out.addfile(info, io.BytesIO(data))
                continue
            bad = tarfile.TarInfo(info.name)
            if damage == "folder":
                bad.type = tarfile.DIRTYPE
                out.addfile(bad)
            elif damage == "symlink_out":
                bad.type, bad.linkname = tarfile.SYMTYPE, str(d / "outside.txt")
                out.addfile(bad)
            else:
                payload = _damage_bytes(damage, data)
                bad.size = len(payload)
                out.addfile(bad, io.BytesIO(payload))
    return key


def run_member_cases(cases: list[GenCase], shards: Path, scratch: Path) -> list[GenResult]:
    from shards.__main__ import main as shards_main

    results = []
    made: dict[tuple[str, str], tuple[Path, Path, str]] = {}
    for n, case in enumerate(cases):
        key = (case.target, case.kind)
        if key not in made:
            made[key] = damaged_set(shards, case.target, case.kind, scratch / f"set{n}")
        root, named, sample = made[key]
        start = time.perf_counter()
        if case.value == "train":
            outcome, detail = _train(case, root, named, sample, scratch / f"out{n}")
        else:
            code, out, err, _stopped, tb = _call(shards_main, [case.value, str(root)])
            outcome, detail = ("traceback", tb[-2000:]) if tb else _judge_shards(case, code, out, err, named, sample)
        results.append(GenResult(case.name, case.family, case.target, case.kind, outcome, detail,
                                 round(time.perf_counter() - start, 4)))
    return results


def _judge_shards(case: GenCase, code, out: str, err: str, named: Path, sample: str) -> tuple[str, str]:
    names = (str(named), *((repr(sample),) if sample else ()))
    if case.value == "check" and code == 1 and not err.strip():  # the problems listed, one per line
        lines = [line for line in out.splitlines() if all(n in line for n in names)]
        return ("refused", lines[0]) if lines else ("unclear", f"exit 1 but no line names {names}: {out[-600:]!r}")
    if code == 0 and case.value == "stats" and case.target == "png":
        return "accepted", STATS_READS_ONLY_JSON
    if code == 0:
        return "silently_accepted", f"shards {case.value} said nothing of {names}: {out[-300:]!r}"
    return judge_refusal(code, err, names)


def _train(case: GenCase, root: Path, named: Path, sample: str, out_dir: Path) -> tuple[str, str]:
    """Pre-work refusals through trainer.train's main, then one pass of the training stream."""
    from bad_input_generated import _pre_work_checks, train_replaced

    argv = _config_argv(GenCase("members", "", "train.steps", "", "1"), root, out_dir)
    with train_replaced(_pre_work_checks) as loop:
        code, _out, err, stopped, tb = _call(loop.main, argv)
    if tb:
        return "traceback", tb[-2000:]
    if stopped is None:
        return judge_refusal(code, err, (str(named),))
    if not sample:
        return _stream_pass(root, case, expect_skip=case.kind == "truncated" and case.target == "tar")
    return _stream_pass(root, case, expect_skip=True)


def _stream_pass(root: Path, case: GenCase, expect_skip: bool) -> tuple[str, str]:
    import traceback

    import webdataset as wds

    from trainer.data.samples import BAD_KINDS, BadSampleCounter
    from trainer.data.shardset import ShardSet
    from trainer.data.stream import StreamSettings, TrainStream

    stream = TrainStream(ShardSet.open(root), "train", StreamSettings(batch_size=2, image_size=32, max_words=32,
                                                                      shuffle_buffer=1, resampled=False, seed=0),
                         rank=0, world_size=1)
    counter = BadSampleCounter()
    try:
        raw = stream.raw_stream(0, 1, counter, False, 0)
        good = sum(1 for _ in wds.map(lambda s: stream._decode(s, raw.rng, counter), handler=counter)(raw.samples()))
    except Exception:  # noqa: BLE001 - what the run would show as a traceback
        return "traceback", traceback.format_exc()[-1500:]
    kinds = {k: n for k, n in zip(BAD_KINDS, counter.by_kind) if n}
    if not expect_skip:
        return "silently_accepted", f"training read {good} samples of a set with {case.target} {case.kind}"
    if not kinds or "other" in kinds or good < 80:
        return "unclear", f"{good} good samples, bad ones counted {kinds}"
    return "refused", f"skipped and counted: {kinds}, {good} good samples read"
