"""fp32 weights of a run's checkpoint gathered into one file: the code of `python -m trainer.export` (what it
writes and its help: trainer/tools/export_args.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from trainer.config import ConfigError
from trainer.engine import checkpoint
from trainer.eval.concat_weight import describe, run_share
from trainer.models.configs import AUTO_WEIGHT
from trainer.tools.export_args import PROG, build_parser
from usercli import OutputExists, cli_main
from usercli.outputs import atomic_output, check_output_file


def export(run_dir: str | Path, out: str | Path, tag: str = "latest", overwrite: bool = False) -> dict:
    """Write the fp32 weights of a run's checkpoint to `out` (an existing file only with `overwrite`); returns what
    was written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--run {run_dir} {'is a file' if run_dir.exists() else 'does not exist'}; give the "
                          f"run folder trainer.train wrote (its run.out_dir)")
    out = check_output_file(out, "--out", example="model.pt")  # a device, a folder, no parent: refused here
    if out.exists() and not overwrite:
        raise OutputExists(f"--out {out} exists; pass --overwrite to replace it, or name another file")
    ckpt_dir = run_dir / "checkpoints"
    tag, marker = checkpoint.find_readable(ckpt_dir, tag, option="--checkpoint")
    config_path = run_dir / "config.yaml"
    weights = checkpoint.fp32_state_dict(ckpt_dir, tag)
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    payload = {
        "state_dict": {k: v.detach().float().contiguous() for k, v in weights.items()},
        "step": marker["step"],
        "tag": tag,
        "run": str(run_dir),
        "config": config,
        "concat_weight": run_concat_weight(config, run_dir),
    }
    try:
        with atomic_output(out) as tmp:  # never a half-written model.pt, nor a temporary left behind
            torch.save(payload, tmp)
    except RuntimeError as e:  # torch's zip writer reports a failed write (full disk, size limit) this way
        raise ConfigError(f"--out {out}: writing failed ({str(e).strip().splitlines()[-1]}): is there space left "
                          f"on the device? Free some or write elsewhere") from e
    return payload


def run_concat_weight(config: dict | None, run_dir: Path) -> dict | None:
    """The concatenation's share the run scores with (trainer.eval.concat_weight.run_share: the config's fixed
    weight, else the share chosen on validation), and where it came from; None for a global-only model or a run
    folder without its config."""
    model, loss = (config or {}).get("model") or {}, (config or {}).get("loss") or {}
    if config is None or loss.get("local") == "none":
        return None
    # an old config.yaml's number, or auto (the default where the key is absent)
    share, source = run_share(model.get("local_score_weight", AUTO_WEIGHT), run_dir)
    return {**describe(share), "source": source}


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    payload = export(args.run, args.out, args.checkpoint, args.overwrite)
    count = sum(v.numel() for v in payload["state_dict"].values())
    print(f"wrote {args.out}: {len(payload['state_dict'])} tensors, {count / 1e6:.2f}M fp32 parameters, "
          f"checkpoint {payload['tag']} (step {payload['step']})"
          + (f", concatenation local share {payload['concat_weight']['local_share']:.3g}"
             if payload["concat_weight"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line on a bad run, checkpoint or output path, a full disk included (shards.cli)."""
    return cli_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
