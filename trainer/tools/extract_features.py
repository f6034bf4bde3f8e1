"""A frozen pretrained backbone run once over a shard set, its grid features written as a new shard set: the code
of `python -m trainer.extract_features` (the output's layout and the command's help:
trainer/tools/extract_features_args.py)."""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from shards.remote import is_url, read_bytes
from trainer.config import ConfigError, check_output_folder
from trainer.data.decode import decode_image_input
from trainer.data.samples import BadSample
from trainer.data.shardset import ShardSet
from trainer.models.backbones.efficientnet_lite import default_weights_path
from trainer.models.configs import ImageTowerConfig
from trainer.models.image_towers import build_image_tower
from trainer.tools.extract_features_args import ENCODERS, PROG, build_parser
from usercli import OutputExists, cli_main

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata, so the same input gives byte-identical tars (as shards.writer does)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _batches(url: str, batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in wds.tarfile_to_samples()([{"url": url}]):
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def extract_shard(encoder: torch.nn.Module, src: str | Path, dst: Path, image_size: int, batch_size: int,
                  device: torch.device) -> int:
    """Features of every picture of one tar (a local file or a URL, streamed), written (via a .partial file) to
    `dst`; returns the sample count."""
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    count = 0
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for batch in _batches(str(src), batch_size):
            for sample in batch:
                if "json" not in sample:
                    raise BadSample(f"{sample['__key__']} in {src}: no json member")
            pictures = torch.stack([decode_image_input(s, image_size, None) for s in batch]).to(device)
            parts = encoder(pictures).to(torch.float16).cpu().numpy()  # [B, P, C]
            for sample, features in zip(batch, parts):
                if not np.isfinite(features).all():
                    raise ValueError(f"{sample['__key__']} in {src}: features overflow float16")
                _add_member(tar, f"{sample['__key__']}.npy", npy_bytes(features))
                _add_member(tar, f"{sample['__key__']}.json", sample["json"])
            count += len(batch)
    os.replace(partial, dst)
    return count


def extract(shards: str | Path, out: str | Path, encoder_name: str = "efficientnet_lite0", image_size: int = 224,
            batch_size: int = 32, weights: str | None = None, device: str | None = None) -> dict:
    """Writes the feature shard set into `out` and returns its manifest."""
    if encoder_name not in ENCODERS:
        raise ConfigError(f"--encoder must be one of {ENCODERS}, got {encoder_name!r}")
    if image_size < 32 or batch_size < 1:
        raise ConfigError(f"--image-size must be >= 32 and --batch-size >= 1, got {image_size} and {batch_size}")
    try:
        src = ShardSet.open(shards)
    except ValueError as e:  # names the file that cannot be read
        raise ConfigError(f"--shards: {e}; give a shard set built by `python -m shards build`") from e
    out = Path(out)
    source = str(src.root) if is_url(src.root) else str(src.root.resolve())
    if source == str(out.resolve()):
        raise ConfigError(f"--out {out} is the input shard set; write the features to a new folder")
    if (out / "manifest.json").exists():
        raise OutputExists(f"{out / 'manifest.json'} exists: {out} already holds a shard set; choose a new --out")
    check_output_folder("--out", out)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"--weights {weights} is not a file; give the backbone's .pth state dict, or leave it "
                          f"out for the installed package's")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # before the output folder is made: a refusal leaves nothing behind
        tower = ImageTowerConfig(kind=encoder_name, image_size=image_size, backbone_trainable="frozen",
                                 backbone_weights=weights)
        encoder = build_image_tower(tower).to(dev).eval()
    except (ValueError, FileNotFoundError) as e:  # an unreadable or missing weights file, named
        raise ConfigError(f"--weights: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(read_bytes(src.root / "manifest.json"))
    start = time.perf_counter()
    for split, info in manifest["splits"].items():
        written = sum(extract_shard(encoder, url, out / url.rsplit("/", 1)[-1], image_size, batch_size, dev)
                      for url in src.urls(split))
        if written != info["images"]:
            raise ValueError(f"split {split!r}: {written} samples in its shards, the manifest says {info['images']}")
        log.info("split %s: %d pictures -> features (%.0f s so far)", split, written, time.perf_counter() - start)
    for name in ("concepts.json", "vocab.json"):
        (out / name).write_bytes(read_bytes(src.root / name))
    manifest["image_ext"] = "npy"
    manifest["image_features"] = {
        "encoder": encoder_name, "image_size": image_size, "parts": encoder.num_parts, "dim": encoder.out_dim,
        "dtype": "float16", "layout": "[parts, channels], grid cells row-major",
        "weights": str(weights or default_weights_path()), "from_shards": source,
        "extracted_by": "python -m trainer.extract_features",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = extract(args.shards, args.out, args.encoder, args.image_size, args.batch_size, args.weights,
                       args.device)
    feats = manifest["image_features"]
    print(f"wrote {args.out}: {feats['parts']} parts x {feats['dim']} channels per picture. Train on it with\n"
          f"  data.shards={args.out} model.image_encoder=regions model.region_dim={feats['dim']} "
          f"model.max_regions={feats['parts']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line on a bad shard set, output folder or weights file; 130 when interrupted (the
    output folder then has no manifest.json: not a shard set, and a rerun writes it again)."""
    return cli_main(_main, argv, PROG, interrupted_hint="the output has no manifest.json yet; run again")


if __name__ == "__main__":
    sys.exit(main())
