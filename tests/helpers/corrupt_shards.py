"""Fault injection into a shard set: each kind of corrupt sample of trainer.data.BAD_KINDS, written into copies
of real shards between their good samples, and a tar cut off in the middle. Used by tests/integration/test_faults.py and
bench/faults.py.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

PICKLE_WITNESS = "unpickled.txt"  # created in the shard-set folder only if something unpickles a member


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header) with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class _Witness:
    """Unpickling this creates PICKLE_WITNESS: proof that a shard member went through pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "a shard member was unpickled"))


def bad_samples(key: str, png: bytes, meta: dict, num_concepts: int, witness: Path) -> dict[str, list]:
    """{kind: tar members of one sample of that kind}, keys made from `key`."""
    def js(m: dict) -> bytes:
        return json.dumps(m).encode()
    return {
        "missing_json": [(f"{key}-nojson.png", png)],
        "malformed_json": [(f"{key}-badjson.png", png), (f"{key}-badjson.json", b'{"captions": ["a red')],
        "empty_captions": [(f"{key}-nocaps.png", png),
                           (f"{key}-nocaps.json", js(dict(meta, captions=[], caption_concepts=[])))],
        "concept_out_of_range": [(f"{key}-badids.png", png),
                                 (f"{key}-badids.json", js(dict(meta, image_concepts=[num_concepts + 7])))],
        "missing_image": [(f"{key}-nopic.json", js(meta))],
        "undecodable_image": [(f"{key}-badpng.png", b"\x89PNG\r\n\x1a\n not a picture"),
                              (f"{key}-badpng.json", js(meta))],
        "image_too_large": [(f"{key}-bomb.png", png_header_only(30_000, 30_000)), (f"{key}-bomb.json", js(meta))],
        # Not a bad sample: a good one with an extra pickled member, which must stay bytes.
        "good_with_pickle": [(f"{key}-pickle.png", png), (f"{key}-pickle.json", js(meta)),
                             (f"{key}-pickle.pyd", pickle.dumps(_Witness(str(witness))))],
    }


def corrupt_copy(src: Path, dst: Path, kinds_per_shard: int = 1, truncate_shard: bool = True) -> dict:
    """Copy the shard set at `src` to `dst` with bad samples put into every train shard (each kind
    `kinds_per_shard` times) and, if asked, the last train shard cut off inside a picture member.

    Returns {"bad": Counter of kinds injected, "good": number of intact good train samples,
    "good_ids": their image ids, "witness": the file whose existence means something was unpickled}."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    num_concepts = len(json.loads((dst / "concepts.json").read_text())["concepts"])
    witness = dst / PICKLE_WITNESS
    injected: Counter = Counter()
    good_ids: list[str] = []
    shards = manifest["splits"]["train"]["shards"]
    for index, name in enumerate(shards):
        path = dst / name
        members = read_members(path)
        samples: dict[str, list] = {}
        for member_name, data in members:
            samples.setdefault(member_name.rsplit(".", 1)[0], []).append((member_name, data))
        keys = list(samples)
        first = samples[keys[0]]
        png = next(d for n, d in first if n.endswith(".png"))
        meta = json.loads(next(d for n, d in first if n.endswith(".json")))
        out: list[tuple[str, bytes]] = []
        for i, key in enumerate(keys):
            out += samples[key]
            good_ids.append(json.loads(next(d for n, d in samples[key] if n.endswith(".json")))["image_id"])
            if i < kinds_per_shard:
                for kind, bad in bad_samples(f"{key}-{i}", png, meta, num_concepts, witness).items():
                    out += bad
                    if kind == "good_with_pickle":
                        good_ids.append(meta["image_id"])
                    else:
                        injected[kind] += 1
        write_tar(path, out)
        if truncate_shard and index == len(shards) - 1:
            # Cut inside the last sample's picture: that sample is lost (one truncated_tar), the rest stays.
            good_ids.pop()
            data = path.read_bytes()
            last_png = out[-2][1]
            cut = data.rfind(last_png[:64]) + len(last_png) // 2
            path.write_bytes(data[:cut])
            injected["truncated_tar"] += 1
    return {"bad": injected, "good": len(good_ids), "good_ids": good_ids, "witness": witness}
