"""Export a run's fp32 weights (ZeRO partitions gathered, as DeepSpeed's zero_to_fp32) to one file.

    python -m trainer.export --run runs/builtin --out model.pt
    python -m trainer.export --run runs/builtin --checkpoint step0000200 --out model.pt

No process group and no GPU: the checkpoint files are read directly (the last complete checkpoint by
default; an incomplete or truncated one is refused naming the file). model.pt holds {"state_dict" (fp32
tensors), "step", "tag", "run", "config"} and loads with torch.load(weights_only=True); a new run starts from
it with model.init_from=model.pt, on any number of ranks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from trainer import checkpoint


def export(run_dir: str | Path, out: str | Path, tag: str = "latest") -> dict:
    """Write the fp32 weights of a run's checkpoint to `out`; returns what was written."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag, marker = checkpoint.find(ckpt_dir, tag)
    config_path = run_dir / "config.yaml"
    weights = checkpoint.fp32_state_dict(ckpt_dir, tag)
    payload = {
        "state_dict": {k: v.detach().float().contiguous() for k, v in weights.items()},
        "step": marker["step"],
        "tag": tag,
        "run": str(run_dir),
        "config": yaml.safe_load(config_path.read_text()) if config_path.is_file() else None,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(out)  # never a half-written model.pt
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (run.out_dir)")
    parser.add_argument("--checkpoint", default="latest", help="checkpoint tag in RUN/checkpoints, or latest")
    parser.add_argument("--out", required=True, help="file to write, e.g. model.pt")
    args = parser.parse_args(argv)
    try:
        payload = export(args.run, args.out, args.checkpoint)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = sum(v.numel() for v in payload["state_dict"].values())
    print(f"wrote {args.out}: {len(payload['state_dict'])} tensors, {count / 1e6:.2f}M fp32 parameters, "
          f"checkpoint {payload['tag']} (step {payload['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
