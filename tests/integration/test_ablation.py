"""bench/ablation.py's statistics: standard errors, paired differences per seed, and the table rebuilt from
finished runs' eval JSON without training."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import ablation  # noqa: E402


def test_mean_se_and_paired_differences():
    mean, se = ablation.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(ablation.mean_se([3.0])[1])
    # a steady +1 per seed beats a large seed spread: the paired SE is 0.1, the unpaired spread ~30
    a = {0: 101.0, 1: 151.1, 2: 90.9, 3: 120.0}
    b = {0: 100.0, 1: 150.0, 2: 90.0, 3: 119.0}
    d = ablation.paired(a, b)
    assert d["diff"] == pytest.approx(1.0, abs=0.01) and d["n"] == 4 and d["significant"]
    assert not ablation.paired({0: 1.0, 1: 5.0}, {0: 2.0, 1: 2.0})["significant"]  # +3 and -1: SE 2
    assert ablation.paired({0: 1.0, 7: 2.0}, {0: 0.5, 5: 1.0})["n"] == 1  # only seeds both have are paired
    assert ablation.paired({0: 1.0}, {1: 1.0}) is None
    assert not ablation.paired({0: 2.0, 1: 2.1}, {0: 1.0, 1: 1.0})["significant"]  # two seeds: no verdict


def fake_run(out: Path, variant: str, seed: int, concat: float, local: float, glob: float) -> None:
    for split in ("val", "test"):
        row = lambda rsum: {"i2t_r1": 0.0, "rsum": rsum}  # noqa: E731
        record = {"split": split, "step": 300, "global": row(glob), "chance": {"rsum": 3.2}}
        if variant != "global_only":
            record.update({"local": row(local), "concat": row(concat),
                           "pmrp": {"concat": {"pmrp": concat / 10}, "local": {"pmrp": 1.0}, "global": {"pmrp": 1.0}}})
        (out / f"{variant}-s{seed}" / "eval").mkdir(parents=True, exist_ok=True)
        (out / f"{variant}-s{seed}" / "eval" / f"{split}.json").write_text(json.dumps(record))


def test_table_rebuilt_from_finished_runs(tmp_path):
    for seed in range(5):
        fake_run(tmp_path, "concepts_mass", seed, 100 + seed + 5, 90, 30)
        fake_run(tmp_path, "shuffled_mass", seed, 100 + seed + (seed % 2), 80, 30)
        fake_run(tmp_path, "none", seed, 100 + seed, 85, 30)
        fake_run(tmp_path, "global_only", seed, 0, 0, 60 + seed)
    plot = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "ablation.py"), "--no-train", "--out", str(tmp_path),
                           "--variants", "global_only", "concepts_mass", "shuffled_mass", "none", "--plot", str(plot),
                           "--markdown", str(tmp_path / "table.md")],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {(r["split"], r["score"], r["variant"]): r for r in result["rows"]}
    concat = rows[("test", "concat", "concepts_mass")]
    assert concat["n"] == 5 and concat["mean"] == 107.0
    assert concat["vs"]["label_free"]["diff"] == 5.0 and concat["vs"]["label_free"]["se"] == 0.0
    assert concat["vs"]["shuffled"]["diff"] == pytest.approx(4.6) and concat["vs"]["shuffled"]["significant"]
    assert concat["vs"]["global_only"]["diff"] == 45.0  # against the global-only model's (only) score
    assert ("test", "concat", "global_only") not in rows and ("test", "global", "global_only") in rows
    assert "*" in done.stdout and plot.stat().st_size > 0
    assert "| concepts_mass | 5 | 107.0 ± 0.7 | +4.6 ± " in (tmp_path / "table.md").read_text()
    pmrp = subprocess.run([sys.executable, str(REPO / "bench" / "ablation.py"), "--no-train", "--out", str(tmp_path),
                           "--variants", "concepts_mass", "none", "--metric", "pmrp", "--plot", str(plot)],
                          capture_output=True, text=True, check=True)
    rows = json.loads(pmrp.stdout.strip().splitlines()[-1])["rows"]
    assert [r["mean"] for r in rows if r["split"] == "test" and r["score"] == "concat"] == [10.7, 10.2]
    assert "chance rSum" in done.stdout and "chance rSum" not in pmrp.stdout  # rSum's chance is not PMRP's
