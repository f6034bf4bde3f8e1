"""The concatenation's mix of the two spaces (docs/design.md section 1, "Score"): chosen on the validation split,
recorded in the run folder, and read back by the commands that use a run (evaluate, export, retrieve).

A score mixes the spaces with a local share a in [0, 1]:

    s = (1 - a) <g_v, g_t> + a <l_v, l_t> = <[sqrt(1 - a) g_v; sqrt(a) l_v], [sqrt(1 - a) g_t; sqrt(a) l_t]>,

so retrieval stays one inner product of unit vectors. a = 0 is the global space alone, a = 1 the local space
alone. A number w in model.local_score_weight fixes a = w / (1 + w), which ranks exactly as the paper's
<g, g> + w <l, l> (the same score divided by 1 + w). With model.local_score_weight=auto (the default) a is chosen
on the validation split from SHARE_GRID, by the rSum of both directions; the grid holds both ends, so the chosen
mix is never below the better single space on validation. A tie keeps the share the model had (the previous
choice, or DEFAULT_SHARE). The choice is written to RUN/eval/concat_weight.json (RECORD_FILE) and into the
validation split's eval json ("concat_weight").
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import ConfigError
from trainer.models.configs import AUTO_WEIGHT, DEFAULT_SHARE, share_of_weight

# w = 0, 1/9, 1/4, 1/2, 1, 2, 4, 9 and infinite: symmetric in log w around the paper's w = 1, both ends included
SHARE_GRID = (0.0, 0.1, 0.2, 1 / 3, 0.5, 2 / 3, 0.8, 0.9, 1.0)
RECORD_FILE = "eval/concat_weight.json"  # beside the eval jsons: --overwrite moves it aside with them
TIE_RSUM = 1e-6  # rSums closer than this are the same ranking's sums, added in another order


def weight_of_share(share: float) -> float | None:
    """w = a / (1 - a); None for a = 1 (the local space alone has no finite w)."""
    return None if share >= 1.0 else share / (1.0 - share)


def configured_share(local_score_weight: float | str) -> float | None:
    """model.local_score_weight as a share: None for auto (chosen on validation)."""
    return None if local_score_weight == AUTO_WEIGHT else share_of_weight(float(local_score_weight))


def choose_share(rsums: dict[float, float], prefer: float = DEFAULT_SHARE) -> float:
    """The share of the highest rSum; among ties the one nearest `prefer` (the previous or default share)."""
    if not rsums:
        raise ValueError("no shares to choose from")
    best = max(rsums.values())
    tied = [share for share, rsum in rsums.items() if rsum >= best - TIE_RSUM]
    return min(tied, key=lambda share: (abs(share - prefer), share))


def describe(share: float) -> dict:
    """The share and its weight, as the eval json, the record and the exported model hold them."""
    weight = weight_of_share(share)
    return {"local_share": share, "local_score_weight": None if weight is None else round(weight, 9)}


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_FILE


def write_record(run_dir: str | Path, chosen: dict, split: str, step: int) -> Path:
    """RUN/eval/concat_weight.json: the chosen share, where and when it was chosen, and the grid's rSums."""
    path = record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**chosen, "chosen_on": split, "step": step}, indent=2))
    return path


def read_record(run_dir: str | Path) -> dict | None:
    """The run's recorded choice, or None where none was made yet (no validation split evaluated)."""
    path = record_path(run_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        share = float(record["local_share"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a concatenation weight record ({e}); delete it and evaluate the "
                          f"validation split again (python -m trainer.evaluate --run RUN --split val)") from e
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"{path}: local_share must be in [0, 1], got {share}")
    return {**record, "local_share": share}


def run_share(local_score_weight: float | str, run_dir: str | Path) -> tuple[float, str]:
    """The share a run's commands score with, and where it came from: a fixed weight of the config, else the
    run's record, else DEFAULT_SHARE (nothing chosen yet)."""
    fixed = configured_share(local_score_weight)
    if fixed is not None:
        return fixed, f"model.local_score_weight={local_score_weight}"
    record = read_record(run_dir)
    if record is None:
        return DEFAULT_SHARE, f"default (model.local_score_weight=auto and no {record_path(run_dir)} yet)"
    return record["local_share"], (f"chosen on {record.get('chosen_on')} at step {record.get('step')} "
                                   f"({record_path(run_dir)})")


def exported_share(saved: dict) -> float | None:
    """The share a `python -m trainer.export` file carries (None for a file exported before it carried one)."""
    concat = saved.get("concat_weight")
    return None if not isinstance(concat, dict) else float(concat["local_share"])
