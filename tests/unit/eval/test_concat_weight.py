"""The concatenation's local share: chosen on validation by rSum from a grid with both ends, recorded in the run
folder, read back by the commands (trainer.eval.concat_weight, trainer.eval.evaluation.score_mixed)."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.config import ConfigError
from trainer.eval import concat_weight
from trainer.eval.concat_weight import SHARE_GRID, choose_share, read_record, run_share, weight_of_share
from trainer.eval.evaluation import results_table, score_embeddings, score_mixed, write_results


def _embeddings(global_noise: float, local_noise: float, seed: int = 0, images: int = 80, per: int = 2) -> dict:
    """Each picture and its captions share a latent vector; each space sees it through its own noise (independent
    across the spaces, so a mix averages some of it away)."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(images, 16, generator=gen)
    cap_to_img = torch.arange(images).repeat_interleave(per)

    def space(rows: torch.Tensor, noise: float) -> torch.Tensor:
        return torch.nn.functional.normalize(rows + noise * torch.randn(rows.shape, generator=gen), dim=1)

    return {"img_g": space(latent, global_noise), "img_l": space(latent, local_noise),
            "cap_g": space(latent[cap_to_img], global_noise), "cap_l": space(latent[cap_to_img], local_noise),
            "cap_to_img": cap_to_img}


@pytest.mark.parametrize("global_noise,local_noise,shares", [
    (0.9, 3.0, (0.0, 0.1, 0.2)),  # the global space is the better one: (almost) nothing of the local
    (3.0, 0.9, (0.8, 0.9, 1.0)),  # the local space is the better one
    (1.3, 1.3, (1 / 3, 0.5, 2 / 3)),  # as good as each other, independent noise: the mix beats both
])
def test_the_chosen_share_is_never_below_the_better_single_space(global_noise, local_noise, shares):
    emb = _embeddings(global_noise, local_noise)
    results = score_mixed(emb, 0.5, choose=True)
    chosen = results["concat_weight"]
    assert chosen["chosen"] and chosen["local_share"] in shares, chosen
    assert results["concat"]["rsum"] >= max(results["global"]["rsum"], results["local"]["rsum"])
    assert results["concat"]["rsum"] == max(chosen["grid_rsum"].values())
    assert list(chosen["grid_rsum"]) == [f"{a:.4f}" for a in SHARE_GRID]  # both ends included
    assert chosen["grid_rsum"]["0.0000"] == results["global"]["rsum"]
    assert chosen["grid_rsum"]["1.0000"] == results["local"]["rsum"]
    # scoring with the chosen share (as the test split does) gives the same concat as the choice's own
    again = score_mixed(emb, chosen["local_share"])
    assert again["concat"] == results["concat"] and not again["concat_weight"]["chosen"]


def test_a_mix_beats_both_spaces_when_their_noise_is_independent():
    results = score_mixed(_embeddings(1.3, 1.3), 0.5, choose=True)
    assert results["concat"]["rsum"] > max(results["global"]["rsum"], results["local"]["rsum"]) + 20


def test_ties_keep_the_previous_share_then_the_nearest():
    flat = {share: 100.0 for share in SHARE_GRID}
    assert choose_share(flat) == 0.5  # the default (w = 1)
    assert choose_share(flat, prefer=0.8) == 0.8  # the previous choice stays while nothing beats it
    assert choose_share({0.0: 90.0, 0.2: 95.0, 0.8: 95.0 + 1e-9, 1.0: 80.0}, prefer=0.0) == 0.2
    assert choose_share({0.0: 90.0, 0.2: 95.0, 0.8: 96.0, 1.0: 80.0}, prefer=0.0) == 0.8
    with pytest.raises(ValueError, match="no shares"):
        choose_share({})


def test_without_a_local_space_nothing_is_chosen():
    emb = _embeddings(1.0, 1.0)
    emb["img_l"] = emb["cap_l"] = None
    results = score_mixed(emb, 0.5, choose=True)
    assert set(results) >= {"global", "chance", "counts"} and "concat" not in results
    assert "concat_weight" not in results


def test_score_embeddings_keeps_the_weight_of_the_paper():
    """score_embeddings(emb, w): <g,g> + w <l,l>, i.e. the share w / (1 + w)."""
    emb = _embeddings(1.2, 1.5)
    assert score_embeddings(emb, 2.0)["concat"] == score_mixed(emb, 2 / 3)["concat"]
    assert score_embeddings(emb, 0.0)["concat"] == score_mixed(emb, 0.0)["global"]


def test_the_choice_is_recorded_and_read_back(tmp_path):
    emb = _embeddings(3.0, 0.9)
    chosen = score_mixed(emb, 0.5, choose=True)
    write_results(chosen, tmp_path, "val", 40)
    record = read_record(tmp_path)
    assert record["local_share"] == chosen["concat_weight"]["local_share"]
    assert (record["chosen_on"], record["step"]) == ("val", 40)
    assert json.loads((tmp_path / "eval" / "val.json").read_text())["concat_weight"] == chosen["concat_weight"]
    assert "chosen on this split" in results_table(chosen)
    share, source = run_share("auto", tmp_path)
    assert share == record["local_share"] and "chosen on val at step 40" in source
    assert run_share(2.0, tmp_path) == (2 / 3, "model.local_score_weight=2.0")  # a fixed weight wins
    # a split scored with the run's share does not write the record
    write_results(score_mixed(emb, 0.2), tmp_path, "test", 50)
    assert read_record(tmp_path)["step"] == 40


def test_no_record_yet_and_a_broken_record(tmp_path):
    share, source = run_share("auto", tmp_path)
    assert share == 0.5 and "no " in source
    path = concat_weight.record_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="concat_weight.json is not a concatenation weight record"):
        run_share("auto", tmp_path)
    path.write_text(json.dumps({"local_share": 1.5}))
    with pytest.raises(ConfigError, match=r"local_share must be in \[0, 1\]"):
        read_record(tmp_path)


def test_weight_and_share_convert_both_ways():
    assert [weight_of_share(a) for a in (0.0, 0.5, 0.8)] == [0.0, 1.0, pytest.approx(4.0)]
    assert weight_of_share(1.0) is None  # the local space alone: no finite w
    assert concat_weight.exported_share({"concat_weight": {"local_share": 0.2}}) == 0.2
    assert concat_weight.exported_share({"state_dict": {}}) is None  # a file exported before the share
