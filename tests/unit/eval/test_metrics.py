"""Tests for trainer.eval.metrics: hand-computed ranks, chunking, recalls, chance levels, tables, refusals."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch.overrides import TorchFunctionMode

from trainer.eval.metrics import (
    chance_recalls,
    combined_retrieval_ranks,
    concat_rows,
    evaluate_embeddings,
    fold_average,
    format_table,
    mix_recalls,
    object_classes,
    plausible_match_precision,
    plausible_match_scores,
    recalls,
    retrieval_ranks,
)


def vectors_scoring(scores: list[list[float]] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption vectors whose inner products are exactly `scores` [I, C] (one-hot images)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(scores.shape[0]), scores.T.contiguous()


# Images with 1, 2 and 5 captions. Image 1's best caption is its 2nd one (caption 2); ties in both directions.
CAP_TO_IMG = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2])
SCORES = [
    # c0    c1   c2    c3   c4   c5   c6   c7
    [0.9, 0.1, 0.95, 0.2, 0.3, 0.9, 0.0, 0.5],  # image 0: own c0=0.9; c2 above, c5 tied -> 2
    [0.4, 0.3, 0.8, 0.7, 0.6, 0.1, 0.2, 0.5],   # image 1: own best c2=0.8 (not c1=0.3) -> 0
    [0.6, 0.6, 0.1, 0.2, 0.6, 0.5, 0.3, 0.4],   # image 2: own best c4=0.6; c0, c1 tied -> 2
]
EXPECTED_I2T = [2, 0, 2]
# Per column, number of other images scoring >= the own image (ties counted): e.g. c3 own 0.2, img0 ties, img1 above.
EXPECTED_T2I = [0, 1, 1, 2, 1, 1, 0, 2]


def test_ranks_by_hand_with_ties_and_variable_captions():
    img, cap = vectors_scoring(SCORES)
    i2t, t2i = retrieval_ranks(img, cap, CAP_TO_IMG)
    assert i2t.dtype == t2i.dtype == torch.int64
    assert i2t.tolist() == EXPECTED_I2T
    assert t2i.tolist() == EXPECTED_T2I


def test_ranks_use_the_best_own_caption_not_the_first():
    # Two images, two captions each; image 0's first caption is poor, its second is the best of all.
    img, cap = vectors_scoring([[0.1, 0.9, 0.5, 0.4],
                                [0.2, 0.3, 0.6, 0.7]])
    i2t, t2i = retrieval_ranks(img, cap, torch.tensor([0, 0, 1, 1]))
    assert i2t.tolist() == [0, 0]
    assert t2i.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_ranks_do_not_depend_on_chunk_size(chunk_size):
    gen = torch.Generator().manual_seed(0)
    caps_per_image = torch.randint(1, 6, (23,), generator=gen)
    cap_to_img = torch.repeat_interleave(torch.arange(23), caps_per_image)
    cap_to_img = cap_to_img[torch.randperm(cap_to_img.numel(), generator=gen)]  # captions in any order
    img = torch.nn.functional.normalize(torch.randn(23, 8, generator=gen), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(cap_to_img.numel(), 8, generator=gen), dim=1)
    full_i2t, full_t2i = retrieval_ranks(img, cap, cap_to_img, chunk_size=cap_to_img.numel())
    i2t, t2i = retrieval_ranks(img, cap, cap_to_img, chunk_size=chunk_size)
    assert torch.equal(i2t, full_i2t) and torch.equal(t2i, full_t2i)
    # and the small fixture gives its hand-computed ranks at every chunk size
    i2t, t2i = retrieval_ranks(*vectors_scoring(SCORES), CAP_TO_IMG, chunk_size=chunk_size)
    assert i2t.tolist() == EXPECTED_I2T and t2i.tolist() == EXPECTED_T2I


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel())
        return out


def test_never_builds_the_full_score_matrix():
    num_images, caps_each, chunk = 20, 3, 8
    img = torch.randn(num_images, 1)  # 1-d vectors: the inputs (60 numbers) are smaller than one tile
    cap = torch.randn(num_images * caps_each, 1)
    cap_to_img = torch.arange(num_images).repeat_interleave(caps_each)
    with _LargestTensor() as probe:
        retrieval_ranks(img, cap, cap_to_img, chunk_size=chunk)
    # tiles of a chunk of images against one chunk's captions, never [chunk, C], let alone [I, C]
    assert probe.largest == chunk * chunk * caps_each


def test_bf16_inputs_are_scored_in_float32():
    # own score 1 + 2^-10 vs negative 1.0: distinct in float32, a tie after bf16 rounding
    img = torch.tensor([[1.0, 2.0 ** -10], [0.0, 0.0]], dtype=torch.bfloat16)
    cap = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.bfloat16)
    i2t, _ = retrieval_ranks(img, cap, torch.tensor([0, 1]))
    assert i2t.tolist() == [0, 1]  # image 0's own caption beats the 1.0 negative only in float32


def test_constant_scores_are_ranked_pessimistically():
    num_images, caps_each = 4, 3
    img = torch.ones(num_images, 5)
    cap = torch.ones(num_images * caps_each, 5)
    cap_to_img = torch.arange(num_images).repeat_interleave(caps_each)
    i2t, t2i = retrieval_ranks(img, cap, cap_to_img)
    assert i2t.tolist() == [9] * num_images  # every one of the 9 other captions ties
    assert t2i.tolist() == [3] * (num_images * caps_each)
    r = recalls(i2t, t2i)
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
    assert r["i2t_r10"] == 100.0 and r["t2i_r5"] == 100.0  # only once K exceeds the number of negatives


def test_identical_vectors_tie_across_tiles():
    # A collapsed model: every picture and caption has the same vector; with several tiles of different shapes
    # every candidate must still tie with the match and rank above it. Multiples of 1/8 make every inner product
    # exact: a GEMM may round the same dot product differently at different places of one output, so vectors
    # with inexact products can miss a tie by one ulp whatever the tiling (also in one full product).
    gen = torch.Generator().manual_seed(5)
    vector = torch.randint(-4, 5, (1, 37), generator=gen).float() / 8
    caps_per_image = torch.randint(1, 6, (11,), generator=gen)
    cap_to_img = torch.repeat_interleave(torch.arange(11), caps_per_image)
    i2t, t2i = retrieval_ranks(vector.expand(11, -1), vector.expand(cap_to_img.numel(), -1), cap_to_img,
                               chunk_size=4)
    assert i2t.tolist() == (cap_to_img.numel() - caps_per_image).tolist()
    assert t2i.tolist() == [10] * cap_to_img.numel()


def test_combined_ranks_equal_one_score_at_a_time():
    gen = torch.Generator().manual_seed(6)
    cap_to_img = torch.repeat_interleave(torch.arange(17), torch.randint(1, 5, (17,), generator=gen))
    cap_to_img = cap_to_img[torch.randperm(cap_to_img.numel(), generator=gen)]
    img = [_random_embeddings(gen, 17, 5) for _ in range(2)]
    cap = [_random_embeddings(gen, cap_to_img.numel(), 5) for _ in range(2)]
    scores = {"a": (1.0, 0.0), "b": (0.0, 1.0), "ab": (0.5, 2.0)}
    combined = combined_retrieval_ranks(img, cap, scores, cap_to_img, chunk_size=3)
    for name, (wa, wb) in scores.items():
        reference = torch.cat([wa * img[0], img[1]], 1), torch.cat([cap[0], wb * cap[1]], 1)
        i2t, t2i = retrieval_ranks(*reference, cap_to_img, chunk_size=100)
        assert torch.equal(combined[name][0], i2t) and torch.equal(combined[name][1], t2i), name


def test_recalls_on_known_ranks():
    i2t = torch.tensor([0, 1, 4, 5, 9, 10, 20, 0])
    t2i = torch.tensor([0, 0, 0, 3, 7, 12, 2, 10, 11, 5])
    r = recalls(i2t, t2i)
    expected = {"i2t_r1": 25.0, "i2t_r5": 50.0, "i2t_r10": 75.0,
                "t2i_r1": 30.0, "t2i_r5": 50.0, "t2i_r10": 70.0}
    assert list(r) == [*expected, "rsum"]
    for key, value in expected.items():
        assert r[key] == pytest.approx(value)
    assert r["rsum"] == pytest.approx(300.0)
    assert recalls(i2t, t2i, ks=(2,)) == pytest.approx({"i2t_r2": 37.5, "t2i_r2": 30.0, "rsum": 67.5})


def test_chance_recalls_exact_for_5k_captions():
    r = chance_recalls([5] * 1000)
    for k in (1, 5, 10):
        exact = 1 - Fraction(math.comb(4995, k), math.comb(5000, k))
        assert r[f"i2t_r{k}"] == pytest.approx(100 * float(exact), rel=1e-12)
        assert r[f"t2i_r{k}"] == pytest.approx(100 * k / 1000, rel=1e-12)
    assert r["i2t_r1"] == pytest.approx(0.1)
    assert r["rsum"] == pytest.approx(3.195605, abs=1e-6)


def test_chance_recalls_when_k_exceeds_the_negatives():
    # one image with 2 captions: nothing to rank against, every recall is certain
    assert chance_recalls(torch.tensor([2])) == pytest.approx(
        {"i2t_r1": 100.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
         "t2i_r1": 100.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "rsum": 600.0})


def test_chance_recalls_match_random_scores():
    gen = torch.Generator().manual_seed(1)
    caps_per_image = torch.tensor([1, 2, 5, 3, 1, 4, 2, 5, 1, 1, 3, 2, 5, 2, 1, 4, 1, 2, 3, 5])
    cap_to_img = torch.repeat_interleave(torch.arange(caps_per_image.numel()), caps_per_image)
    trials = [retrieval_ranks(*vectors_scoring(torch.rand(caps_per_image.numel(), cap_to_img.numel(),
                                                          generator=gen)), cap_to_img)
              for _ in range(300)]
    estimate = recalls(torch.cat([i2t for i2t, _ in trials]), torch.cat([t2i for _, t2i in trials]))
    expected = chance_recalls(caps_per_image)
    assert set(estimate) == set(expected)
    # A Monte Carlo estimate from a seeded software generator and comparisons only: the same figures on every CPU
    # (seed 1: off by 0.15 per recall, 0.64 in rSum). Over generator seeds 0-29 the worst was 1.19 per recall and
    # 4.27 in rSum, inside the bounds below.
    for key in expected:
        if key != "rsum":
            assert estimate[key] == pytest.approx(expected[key], abs=2.5), key
    assert estimate["rsum"] == pytest.approx(expected["rsum"], abs=6.0)
    assert expected["i2t_r10"] > expected["i2t_r1"] > 0  # the fixture is not degenerate


def _random_embeddings(gen, rows, dim=6):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)


def test_evaluate_embeddings_concat_scores_the_mix_of_the_spaces():
    gen = torch.Generator().manual_seed(2)
    cap_to_img = torch.arange(12).repeat_interleave(3)
    img_g, img_l = _random_embeddings(gen, 12), _random_embeddings(gen, 12)
    cap_g, cap_l = _random_embeddings(gen, 36), _random_embeddings(gen, 36)
    out = evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=0.8, chunk_size=5)
    assert list(out) == ["global", "local", "concat"]
    assert out["global"] == recalls(*retrieval_ranks(img_g, cap_g, cap_to_img))
    assert out["local"] == recalls(*retrieval_ranks(img_l, cap_l, cap_to_img))
    manual = recalls(*retrieval_ranks(concat_rows(img_g, img_l, 0.8), concat_rows(cap_g, cap_l, 0.8), cap_to_img))
    assert out["concat"] == manual
    # the concatenated vectors score (1 - a) <g,g> + a <l,l>: the ranking of <g,g> + w <l,l> with w = a / (1 - a) = 4
    combined = img_g @ cap_g.T + 4.0 * (img_l @ cap_l.T)
    assert out["concat"] == recalls(*retrieval_ranks(*vectors_scoring(combined), cap_to_img))
    # the ends are the single spaces, exactly
    assert evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=0.0)["concat"] == out["global"]
    assert evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=1.0)["concat"] == out["local"]
    with pytest.raises(ValueError, match=r"local_share must be in \[0, 1\]"):
        evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=1.5)


def test_concat_rows_are_unit_vectors_whose_products_mix_the_spaces():
    gen = torch.Generator().manual_seed(4)
    img_g, img_l, cap_g, cap_l = (_random_embeddings(gen, n) for n in (5, 5, 7, 7))
    for share in (0.0, 0.25, 2 / 3, 1.0):
        img, cap = concat_rows(img_g, img_l, share), concat_rows(cap_g, cap_l, share)
        assert torch.allclose(img.norm(dim=1), torch.ones(5), atol=1e-6)
        assert torch.allclose(img @ cap.T, (1 - share) * img_g @ cap_g.T + share * img_l @ cap_l.T, atol=1e-6)


def test_mix_recalls_scores_every_share_in_one_pass_as_evaluate_embeddings_does():
    gen = torch.Generator().manual_seed(5)
    cap_to_img = torch.arange(20).repeat_interleave(2)
    img_g, img_l = _random_embeddings(gen, 20), _random_embeddings(gen, 20)
    cap_g, cap_l = _random_embeddings(gen, 40), _random_embeddings(gen, 40)
    grid = mix_recalls(img_g, img_l, cap_g, cap_l, cap_to_img, (0.0, 0.2, 0.5, 1.0), chunk_size=6)
    assert list(grid) == [0.0, 0.2, 0.5, 1.0]
    for share, result in grid.items():
        assert result == evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=share)["concat"]


def test_evaluate_embeddings_global_only_without_local_vectors():
    gen = torch.Generator().manual_seed(3)
    cap_to_img = torch.arange(8).repeat_interleave(2)
    img_g, cap_g = _random_embeddings(gen, 8), _random_embeddings(gen, 16)
    out = evaluate_embeddings(img_g, None, cap_g, None, cap_to_img)
    assert list(out) == ["global"]
    assert out["global"] == recalls(*retrieval_ranks(img_g, cap_g, cap_to_img))
    with pytest.raises(ValueError, match="both be given or both be None"):
        evaluate_embeddings(img_g, img_g, cap_g, None, cap_to_img)


def test_refuses_an_image_without_captions():
    img, cap = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"2 of 4 images have no caption.*\[1, 3\]"):
        retrieval_ranks(img, cap, torch.tensor([0, 0, 2, 2, 0]))
    with pytest.raises(ValueError, match=r"images \[2\]"):
        chance_recalls([3, 1, 0])


def test_refuses_out_of_range_image_indices():
    img, cap = torch.randn(3, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"outside 0\.\.2 at captions \[1, 3\]: \[3, -1\]"):
        retrieval_ranks(img, cap, torch.tensor([0, 3, 1, -1]))


def test_refuses_malformed_inputs():
    img, cap = torch.randn(3, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_ranks(img, cap, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dimension 3 but cap_vecs has 2"):
        retrieval_ranks(img, torch.randn(4, 2), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"non-finite values in rows \[1\]"):
        retrieval_ranks(img, cap.index_fill(0, torch.tensor([1]), math.nan), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_ranks(img, cap, torch.tensor([0, 1, 2, 2]), chunk_size=0)


def test_format_table_lists_every_score_and_rsum():
    gen = torch.Generator().manual_seed(4)
    cap_to_img = torch.arange(10).repeat_interleave(5)
    results = evaluate_embeddings(_random_embeddings(gen, 10), _random_embeddings(gen, 10),
                                  _random_embeddings(gen, 50), _random_embeddings(gen, 50), cap_to_img)
    chance = chance_recalls(torch.full((10,), 5))
    table = format_table(results, chance)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    for title in ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rSum"):
        assert title in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["global", "local", "concat", "chance"]
    for name, row in [*results.items(), ("chance", chance)]:
        assert rows[name].split()[1:] == [f"{row[key]:.2f}" for key in
                                          ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
    assert "chance" not in format_table(results)


# ----------------------------------------------------------------------------------------- plausible matches
def ref_pmrp(scores, relevant) -> float:
    """Slow R-precision: per query, the top R items by score (ties: irrelevant first), R = relevant count."""
    total = 0.0
    for row_scores, row_relevant in zip(scores, relevant):
        ranked = sorted(range(len(row_scores)), key=lambda j: (-row_scores[j], row_relevant[j]))
        r = sum(row_relevant)
        total += sum(row_relevant[j] for j in ranked[:r]) / r
    return 100.0 * total / len(scores)


def test_object_classes_are_colour_shape_presence():
    classes = object_classes([[{"colour": "red", "shape": "star"}, {"colour": "red", "shape": "star"}],
                              [{"colour": "blue", "shape": "ring"}, {"colour": "red", "shape": "star"}]])
    assert classes.tolist() == [[0.0, 1.0], [1.0, 1.0]]  # classes sorted: (blue, ring), (red, star)


def test_object_classes_take_a_named_class_where_a_source_gives_one():
    # the emoji corpus: a group and a subgroup per picture, so one subgroup is distance 0, one group 2, else 4
    smile = [{"class": "group:Smileys"}, {"class": "subgroup:face-smiling"}]
    grin = [{"class": "group:Smileys"}, {"class": "subgroup:face-smiling"}]
    heart = [{"class": "group:Smileys"}, {"class": "subgroup:heart"}]
    flag = [{"class": "group:Flags"}, {"class": "subgroup:country-flag"}]
    classes = object_classes([smile, grin, heart, flag])
    assert classes.shape == (4, 5) and classes.sum(1).tolist() == [2.0, 2.0, 2.0, 2.0]
    distance = classes.sum(1, keepdim=True) + classes.sum(1) - 2 * classes @ classes.T
    assert distance[0].tolist() == [0.0, 0.0, 2.0, 4.0]


def test_pmrp_by_hand_with_a_tie():
    # pictures 0 and 1 both show exactly a red star, picture 2 a blue ring; one caption each (caption k of picture k)
    classes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    img, cap = torch.eye(3), torch.eye(3)  # each picture scores only its own caption: the others tie at 0
    out = plausible_match_precision(img, cap, torch.arange(3), classes, distances=(0,))
    # picture 0: relevant captions 0 and 1 (R = 2); top 2 = caption 0, then the tie at 0 goes to caption 2 first
    assert out["i2t_z0"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    assert out["t2i_z0"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    # a model that puts the two red-star pictures together finds every plausible match
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert plausible_match_precision(same, same, torch.arange(3), classes, distances=(0,))["pmrp"] == 100.0
    # at distance 2 every picture is plausible for every query: precision is 1 whatever the scores
    assert plausible_match_precision(img, cap, torch.arange(3), classes, distances=(2,))["pmrp"] == 100.0


def test_pmrp_matches_slow_reference_and_collapse_scores_low():
    g = torch.Generator().manual_seed(0)
    classes = (torch.rand(40, 6, generator=g) < 0.3).float()
    cap_to_img = torch.arange(40).repeat_interleave(3)
    img, cap = torch.randn(40, 8, generator=g), torch.randn(120, 8, generator=g)
    out = plausible_match_precision(img, cap, cap_to_img, classes, chunk_size=7)
    dist = [[int((classes[a] != classes[b]).sum()) for b in range(40)] for a in range(40)]
    scores = (img @ cap.T).tolist()
    for z in (0, 1, 2):
        i2t = ref_pmrp(scores, [[int(dist[i][int(c)] <= z) for c in cap_to_img] for i in range(40)])
        t2i = ref_pmrp((cap @ img.T).tolist(), [[int(dist[int(c)][j] <= z) for j in range(40)] for c in cap_to_img])
        assert out[f"i2t_z{z}"] == pytest.approx(i2t, abs=1e-9) and out[f"t2i_z{z}"] == pytest.approx(t2i, abs=1e-9)
    assert out["pmrp"] == pytest.approx(sum(v for k, v in out.items() if k != "pmrp") / 6)
    collapsed = plausible_match_precision(torch.ones(40, 8), torch.ones(120, 8), cap_to_img, classes)
    assert collapsed["pmrp"] < out["pmrp"]


def test_pmrp_of_each_score_uses_the_concatenated_vector():
    g = torch.Generator().manual_seed(1)
    img_g, img_l, cap_g, cap_l = (torch.randn(n, 4, generator=g) for n in (10, 10, 20, 20))
    cap_to_img = torch.arange(10).repeat_interleave(2)
    classes = (torch.rand(10, 5, generator=g) < 0.4).float()
    out = plausible_match_scores(img_g, img_l, cap_g, cap_l, cap_to_img, classes, local_share=0.8)
    concat = plausible_match_precision(concat_rows(img_g, img_l, 0.8), concat_rows(cap_g, cap_l, 0.8), cap_to_img,
                                       classes)
    assert out["concat"] == concat and set(out) == {"global", "local", "concat"}
    assert set(plausible_match_scores(img_g, None, cap_g, None, cap_to_img, classes)) == {"global"}


# ----------------------------------------------------------------------------------------- COCO 1K folds
def test_fold_average_is_the_mean_of_each_fold():
    g = torch.Generator().manual_seed(2)
    img_g, img_l = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    cap_g, cap_l = torch.randn(150, 4, generator=g), torch.randn(150, 4, generator=g)
    cap_to_img = torch.arange(30).repeat_interleave(5)[torch.randperm(150, generator=g)]  # captions not grouped
    out = fold_average(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=1 / 3, fold_size=10)
    folds = []
    for start in (0, 10, 20):
        keep = (cap_to_img >= start) & (cap_to_img < start + 10)
        folds.append(evaluate_embeddings(img_g[start:start + 10], img_l[start:start + 10], cap_g[keep], cap_l[keep],
                                         cap_to_img[keep] - start, local_share=1 / 3))
    for score in ("global", "local", "concat"):
        for key, value in out[score].items():
            assert value == pytest.approx(sum(f[score][key] for f in folds) / 3)
    whole = evaluate_embeddings(img_g, img_l, cap_g, cap_l, cap_to_img, local_share=1 / 3)
    assert out["concat"]["rsum"] > whole["concat"]["rsum"]  # a third of the candidates: easier
    with pytest.raises(ValueError, match="folds of 7"):
        fold_average(img_g, img_l, cap_g, cap_l, cap_to_img, fold_size=7)
