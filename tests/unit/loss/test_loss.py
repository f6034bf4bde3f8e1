"""HierarchicalLoss against a slow per-pair reference written straight from the formulas in docs/design.md."""
from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, LossConfig, load_config
from trainer.loss.global_terms import HingeGlobal, InfoNCEGlobal
from trainer.loss.hierarchical import HierarchicalLoss
from trainer.loss.labels import (
    ConceptLabels,
    NoLabels,
    ShuffledLabels,
    caption_containment,
    jaccard,
    shuffle_permutation,
)
from trainer.loss.local_terms import AdaptiveHingeLocal, NoLocal, SoftContrastiveLocal, soft_contrastive
from trainer.loss.pairs import hinge
from trainer.loss.registry import GLOBAL_TERMS, LABEL_SOURCES, LOCAL_TERMS

EMBED_KEYS = ("img_g", "img_l", "txt_g", "txt_l")
TOL = dict(rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- reference
def ref_jaccard(a_row, b_row) -> float:
    a = {k for k, v in enumerate(a_row) if v > 0}
    b = {k for k, v in enumerate(b_row) if v > 0}
    return len(a & b) / len(a | b) if a | b else 0.0


def ref_dot(u, v):
    return sum(u[d] * v[d] for d in range(len(u)))


def ref_relu(x):
    return x if x > 0 else 0 * x


def ref_hinge(rows, cols, ids, margins, use_sum):
    """mean_i of max (or sum) over j with ids[j] != ids[i] of [margins[i][j] - <r_i, c_i> + <r_i, c_j>]_+."""
    n = len(rows)
    per_row = []
    for i in range(n):
        positive = ref_dot(rows[i], cols[i])
        costs = [ref_relu(margins[i][j] - positive + ref_dot(rows[i], cols[j])) for j in range(n) if ids[j] != ids[i]]
        if not costs:
            per_row.append(0 * positive)
        else:
            per_row.append(sum(costs) if use_sum else max(costs))
    return sum(per_row) / n


def ref_contrastive(rows, cols, ids, labels, temperature):
    n = len(rows)
    total = 0
    for i in range(n):
        logits = [ref_dot(rows[i], cols[j]) / temperature for j in range(n)]
        weights = [1.0 if ids[j] == ids[i] else labels[i][j] for j in range(n)]
        norm = sum(weights)
        log_z = torch.log(sum(torch.exp(x) for x in logits))
        total = total - sum(weights[j] / norm * (logits[j] - log_z) for j in range(n))
    return total / n


def ref_terms(batch, *, local, labels, margin=0.2, local_margin=0.2, temperature=0.05, use_sum=False):
    """Directional terms for the whole batch; `labels` is "concepts" or "none" (shuffling is done by the caller)."""
    ids = batch["image_ids"].tolist()
    n = len(ids)
    img_c, cap_c = batch["image_concepts"].tolist(), batch["caption_concepts"].tolist()
    if labels == "none":
        y_i2t = y_t2i = [[0.0] * n for _ in range(n)]
    else:
        y_i2t = [[ref_jaccard(img_c[i], cap_c[j]) for j in range(n)] for i in range(n)]
        y_t2i = [[ref_jaccard(cap_c[i], img_c[j]) for j in range(n)] for i in range(n)]
    img_g, txt_g, img_l, txt_l = (batch[k] for k in ("img_g", "txt_g", "img_l", "txt_l"))
    flat = [[margin] * n for _ in range(n)]
    out = {"global_i2t": ref_hinge(img_g, txt_g, ids, flat, use_sum),
           "global_t2i": ref_hinge(txt_g, img_g, ids, flat, use_sum)}
    if local == "contrastive":
        out["local_i2t"] = ref_contrastive(img_l, txt_l, ids, y_i2t, temperature)
        out["local_t2i"] = ref_contrastive(txt_l, img_l, ids, y_t2i, temperature)
    elif local == "adaptive_hinge":
        out["local_i2t"] = ref_hinge(img_l, txt_l, ids, [[local_margin * (1 - y) for y in r] for r in y_i2t], use_sum)
        out["local_t2i"] = ref_hinge(txt_l, img_l, ids, [[local_margin * (1 - y) for y in r] for r in y_t2i], use_sum)
    negatives = [(i, j) for i in range(n) for j in range(n) if ids[i] != ids[j]]
    out["label_mean"] = sum(y_i2t[i][j] + y_t2i[i][j] for i, j in negatives) / (2 * len(negatives))
    return out


# ----------------------------------------------------------------------------------------- helpers
def make_loss(*, seed: int = 0, **options) -> HierarchicalLoss:
    """The loss of LossConfig(**options), with hinge_warmup_steps 0 unless given: the hardest negative from step
    0 (the config's default is 200)."""
    return HierarchicalLoss(LossConfig(**{"hinge_warmup_steps": 0, **options}), seed=seed)


def make_batch(n=6, d=4, k=5, ids=(0, 1, 1, 2, 3, 3), seed=0, dtype=torch.float64):
    """Random unit embeddings as leaves; duplicate image ids so that masking is exercised everywhere."""
    g = torch.Generator().manual_seed(seed)
    batch = {key: F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1).requires_grad_()
             for key in EMBED_KEYS}
    batch["image_ids"] = torch.tensor(ids, dtype=torch.int64)
    concepts = (torch.rand(n, k, generator=g) < 0.7).float()  # dense enough that hardest negatives share some
    concepts[0] = 0  # an image with no known concept
    batch["image_concepts"] = concepts
    caption = concepts * (torch.rand(n, k, generator=g) < 0.7).float()
    caption[1, 0] = 1.0  # a caption concept its image row lacks: Jaccard is not symmetric in general
    batch["caption_concepts"] = caption
    return batch


def grads(value, batch):
    found = torch.autograd.grad(value, [batch[k] for k in EMBED_KEYS], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(batch[k]) if g is None else g for k, g in zip(EMBED_KEYS, found)]


def assert_same(ours, ref, batch):
    assert torch.allclose(ours, torch.as_tensor(ref, dtype=ours.dtype), **TOL), (ours, ref)
    for a, b in zip(grads(ours, batch), grads(ref, batch)):
        assert torch.allclose(a, b, **TOL)


# ----------------------------------------------------------------------------------------- reference match
@pytest.mark.parametrize("local", ["contrastive", "adaptive_hinge"])
@pytest.mark.parametrize("labels", ["concepts", "none"])
@pytest.mark.parametrize("step", [0, 5], ids=["warmup-sum", "hardest"])
def test_matches_reference(local, labels, step):
    batch = make_batch()
    loss_fn = make_loss(margin=0.2, hinge_warmup_steps=5, local=local, temperature=0.1, local_margin=0.3,
                               labels=labels, local_weight=0.7)
    out = loss_fn(batch, step=step)
    ref = ref_terms(batch, local=local, labels=labels, margin=0.2, local_margin=0.3, temperature=0.1,
                    use_sum=step < 5)
    for key in ("global_i2t", "global_t2i", "local_i2t", "local_t2i"):
        assert_same(out[key], ref[key], batch)
    assert out["global"] == out["global_i2t"] + out["global_t2i"]
    assert out["local"] == out["local_i2t"] + out["local_t2i"]
    assert torch.allclose(out["loss"], out["global"] + 0.7 * out["local"], **TOL)
    assert torch.allclose(out["label_mean"], torch.tensor(ref["label_mean"], dtype=torch.float64), **TOL)
    assert not out["label_mean"].requires_grad
    assert set(out) == {"loss", "global", "global_i2t", "global_t2i", "local", "local_i2t", "local_t2i",
                        "label_mean"}


def test_warmup_sum_exceeds_hardest_and_local_none_is_global_only():
    batch = make_batch()
    batch = {k: v for k, v in batch.items() if k not in ("img_l", "txt_l")}
    loss_fn = make_loss(local="none", hinge_warmup_steps=3)
    warm, after = loss_fn(batch, step=2), loss_fn(batch, step=3)
    assert warm["global"] > after["global"] > 0  # several violating negatives per row
    assert "local" not in after and torch.equal(after["loss"], after["global"])


# ----------------------------------------------------------------------------------------- masking
def test_second_caption_of_same_picture_is_never_a_negative():
    e = torch.eye(3, dtype=torch.float64)
    # Picture 5 appears twice; caption 1 (of picture 5) matches image 0 better than caption 0 does.
    img = torch.stack([e[0], e[0], e[1]])
    txt = torch.stack([F.normalize(e[0] + e[2], dim=0), e[0], F.normalize(e[0] + e[1], dim=0)])
    batch = {"img_g": img, "txt_g": txt, "img_l": img, "txt_l": txt, "image_ids": torch.tensor([5, 5, 9])}
    out = make_loss(local="contrastive", labels="none", temperature=0.5)(batch)
    s = img @ txt.T

    def hinge(x):
        return max(float(x), 0.0)

    # Only column/row 2 is a negative of rows 0 and 1, in both directions; row 2's negatives are 0 and 1.
    i2t = [hinge(0.2 - s[0, 0] + s[0, 2]), hinge(0.2 - s[1, 1] + s[1, 2]),
           max(hinge(0.2 - s[2, 2] + s[2, 0]), hinge(0.2 - s[2, 2] + s[2, 1]))]
    t2i = [hinge(0.2 - s[0, 0] + s[2, 0]), hinge(0.2 - s[1, 1] + s[2, 1]),
           max(hinge(0.2 - s[2, 2] + s[0, 2]), hinge(0.2 - s[2, 2] + s[1, 2]))]
    assert torch.allclose(out["global_i2t"], torch.tensor(i2t, dtype=torch.float64).mean(), **TOL)
    assert torch.allclose(out["global_t2i"], torch.tensor(t2i, dtype=torch.float64).mean(), **TOL)
    # Contrastive target: weight 1 on both captions of picture 5, normalised; picture 9 only on itself.
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    expected_i2t = -(target * torch.log_softmax(s / 0.5, dim=1)).sum(1).mean()
    expected_t2i = -(target * torch.log_softmax(s.T / 0.5, dim=1)).sum(1).mean()
    assert torch.allclose(out["local_i2t"], expected_i2t, **TOL)
    assert torch.allclose(out["local_t2i"], expected_t2i, **TOL)
    # Were caption 1 a negative of image 0 it would be the hardest one: the loss would grow.
    unmasked = make_loss(local="contrastive", labels="none")({**batch, "image_ids": torch.tensor([5, 6, 9])})
    assert unmasked["global_i2t"] > out["global_i2t"] + 0.05


def test_batch_of_one_picture_has_no_negatives():
    batch = make_batch(n=3, ids=(4, 4, 4))
    out = make_loss(local="adaptive_hinge", labels="none")(batch)
    assert out["global"] == 0 and out["local"] == 0 and out["label_mean"] == 0
    distinct = make_loss(local="adaptive_hinge", labels="none")({**batch, "image_ids": torch.arange(3)})
    assert distinct["global"] > 0  # the same embeddings do violate the margin once the pairs are negatives


# ----------------------------------------------------------------------------------------- row slices
@pytest.mark.parametrize("sizes", [(3, 3), (2, 1, 3)])
@pytest.mark.parametrize("local,labels,step", [("contrastive", "concepts", 0), ("adaptive_hinge", "shuffled", 1),
                                               ("adaptive_hinge", "concepts", 9)])
def test_row_slices_decompose_the_full_batch(sizes, local, labels, step):
    batch = make_batch()
    n = len(batch["image_ids"])
    loss_fn = make_loss(local=local, labels=labels, hinge_warmup_steps=5, concept_bce_weight=0.5, seed=3)
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(n, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    full = loss_fn(batch, step=step, concept_logits=tuple(logits))
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    parts = [loss_fn(batch, row_offset=o, num_rows=m, step=step,
                     concept_logits=(logits[0][o:o + m], logits[1][o:o + m])) for o, m in zip(offsets, sizes)]
    for key in ("loss", "global", "local", "concept_bce"):
        combined = sum(part[key] * m / n for part, m in zip(parts, sizes))
        assert_same(combined, full[key], batch)
        if key in ("loss", "concept_bce"):
            for a, b in zip(torch.autograd.grad(combined, logits, retain_graph=True),
                            torch.autograd.grad(full[key], logits, retain_graph=True)):
                assert torch.allclose(a, b, **TOL)


def test_default_rows_run_from_offset_to_end():
    batch = make_batch()
    loss_fn = make_loss()
    assert torch.equal(loss_fn(batch, row_offset=2)["loss"], loss_fn(batch, row_offset=2, num_rows=4)["loss"])


# ----------------------------------------------------------------------------------------- labels
def test_jaccard_hand_computed_with_empty_sets():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float32)
    expected = torch.tensor([[1 / 2, 0.0, 1 / 4],
                             [0.0, 0.0, 0.0],
                             [1 / 3, 0.0, 2 / 4]])
    assert torch.allclose(jaccard(a, b), expected)
    assert torch.allclose(jaccard(b, a), expected.T)
    with pytest.raises(ValueError, match="jaccard"):
        jaccard(a, b[:, :3])


def test_labels_none_gives_zero_labels_and_plain_identity_targets():
    batch = make_batch()
    out = make_loss(labels="none")(batch)
    assert out["label_mean"] == 0
    unlabelled = {**batch, "image_concepts": torch.zeros(6, 5), "caption_concepts": torch.zeros(6, 5)}
    same = make_loss(labels="concepts")(unlabelled)
    assert torch.allclose(out["local"], same["local"], **TOL)
    assert not torch.allclose(out["local"], make_loss(labels="concepts")(batch)["local"], **TOL)


def test_shuffle_permutation_is_shared_and_changes_per_step():
    first = shuffle_permutation(16, seed=7, step=3)
    assert torch.equal(first, shuffle_permutation(16, seed=7, step=3))
    assert torch.equal(first.sort().values, torch.arange(16))
    assert not torch.equal(first, shuffle_permutation(16, seed=7, step=4))
    assert not torch.equal(first, shuffle_permutation(16, seed=8, step=3))


@pytest.mark.parametrize("local", ["contrastive", "adaptive_hinge"])
def test_shuffled_labels_are_the_concepts_permuted_by_seed_and_step(local):
    batch = make_batch()
    shuffled = make_loss(local=local, labels="shuffled", seed=11)
    for step in (0, 1):
        perm = shuffle_permutation(6, seed=11, step=step)
        permuted = {**batch, "image_concepts": batch["image_concepts"][perm],
                    "caption_concepts": batch["caption_concepts"][perm]}
        expected = make_loss(local=local, labels="concepts")(permuted)["loss"]
        assert torch.allclose(shuffled(batch, step=step)["loss"], expected, **TOL)
    again = make_loss(local=local, labels="shuffled", seed=11)
    assert torch.equal(shuffled(batch, step=4)["loss"], again(batch, step=4)["loss"])
    assert not torch.allclose(shuffled(batch, step=0)["loss"], shuffled(batch, step=1)["loss"], **TOL)
    plain = make_loss(local=local, labels="concepts")(batch)["loss"]
    assert not torch.allclose(shuffled(batch, step=0)["loss"], plain, **TOL)


def test_adaptive_hinge_negative_with_full_label_contributes_nothing():
    e = torch.eye(2, dtype=torch.float64)
    close = F.normalize(e[0] + 0.1 * e[1], dim=0)  # caption 1 is almost image 0's own caption
    img, txt = torch.stack([e[0], e[1]]), torch.stack([e[0], close])
    concepts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # every pair shares every concept: Y = 1
    batch = {"img_g": img, "txt_g": txt, "img_l": img, "txt_l": txt, "image_ids": torch.tensor([0, 1]),
             "image_concepts": concepts, "caption_concepts": concepts}
    labelled = make_loss(local="adaptive_hinge", local_margin=0.2)(batch)
    unlabelled = make_loss(local="adaptive_hinge", local_margin=0.2, labels="none")(batch)
    s = img @ txt.T
    assert labelled["local_i2t"] == 0 and labelled["label_mean"] == 1
    expected = ((0.2 - s[0, 0] + s[0, 1]) + (0.2 - s[1, 1] + s[1, 0])) / 2
    assert torch.allclose(unlabelled["local_i2t"], expected, **TOL) and expected > 0


# ----------------------------------------------------------------------------------------- concept BCE
def manual_bce(logits, targets):
    p = torch.sigmoid(logits)
    return -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()


def test_concept_bce_matches_torch_and_enters_the_total():
    batch = make_batch(n=2, ids=(0, 1), k=3)
    batch["image_concepts"] = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    batch["caption_concepts"] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    image_logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=torch.float64)
    caption_logits = torch.tensor([[-0.5, 1.0, 0.0], [1.5, 2.0, -3.0]], dtype=torch.float64)
    loss_fn = make_loss(concept_bce_weight=0.3, local_weight=2.0)
    out = loss_fn(batch, concept_logits=(image_logits, caption_logits))
    bce = torch.nn.BCEWithLogitsLoss()
    expected = bce(image_logits, batch["image_concepts"].double()) + bce(caption_logits,
                                                                          batch["caption_concepts"].double())
    assert torch.allclose(out["concept_bce"], expected, **TOL)
    manual = manual_bce(image_logits, batch["image_concepts"]) + manual_bce(caption_logits, batch["caption_concepts"])
    assert torch.allclose(out["concept_bce"], manual, **TOL)
    assert torch.allclose(out["loss"], out["global"] + 2.0 * out["local"] + 0.3 * out["concept_bce"], **TOL)


def test_concept_bce_targets_follow_the_shuffle():
    batch = make_batch()
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g))
    out = make_loss(labels="shuffled", seed=1, concept_bce_weight=1.0)(batch, step=2, concept_logits=logits)
    perm = shuffle_permutation(6, seed=1, step=2)
    expected = (F.binary_cross_entropy_with_logits(logits[0], batch["image_concepts"][perm])
                + F.binary_cross_entropy_with_logits(logits[1], batch["caption_concepts"][perm]))
    assert torch.allclose(out["concept_bce"], expected, **TOL)


# ----------------------------------------------------------------------------------------- precision
def test_bf16_inputs_are_scored_in_float32():
    batch = make_batch(dtype=torch.bfloat16)
    out = make_loss()(batch)
    upcast = {k: v.detach().float() if k in EMBED_KEYS else v for k, v in batch.items()}
    expected = make_loss()(upcast)
    assert out["loss"].dtype == torch.float32
    assert torch.allclose(out["loss"], expected["loss"], rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    assert batch["img_l"].grad.dtype == torch.bfloat16 and batch["img_l"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("override,key", [
    ("loss.local=infonce", "loss.local"), ("loss.labels=random", "loss.labels"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.temperature=-1", "loss.temperature"), ("loss.local_weight=-0.1", "loss.local_weight"),
    ("loss.concept_bce_weight=-1", "loss.concept_bce_weight"), ("loss.margin=-0.2", "loss.margin"),
    ("loss.local_margin=-0.2", "loss.local_margin"), ("loss.hinge_warmup_steps=-1", "loss.hinge_warmup_steps"),
    ("loss.concept_bce_weight=1.0 loss.labels=none", "loss.concept_bce_weight"),
])
def test_config_refusals_name_the_key(override, key):
    """The loss's values are checked once, by LossConfig, when the config is read."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, override.split(), check_paths=False)


# ----------------------------------------------------------------------------------------- parts by config string
@pytest.mark.parametrize("name,cls", [("hinge", HingeGlobal), ("infonce", InfoNCEGlobal)])
def test_global_term_is_picked_by_global_loss(name, cls):
    assert type(make_loss(global_loss=name).global_term) is cls


@pytest.mark.parametrize("name,cls", [("contrastive", SoftContrastiveLocal), ("adaptive_hinge", AdaptiveHingeLocal),
                                      ("none", NoLocal)])
def test_local_term_is_picked_by_local(name, cls):
    assert type(make_loss(local=name).local_term) is cls


@pytest.mark.parametrize("name,cls", [("concepts", ConceptLabels), ("shuffled", ShuffledLabels), ("none", NoLabels)])
def test_label_source_is_picked_by_labels(name, cls):
    source = make_loss(labels=name, seed=4).label_source
    assert type(source) is cls
    assert name != "shuffled" or source.seed == 4


def test_every_config_kind_has_a_class_and_no_class_lacks_a_kind():
    hints = typing.get_type_hints(LossConfig)
    for key, table in (("global_loss", GLOBAL_TERMS), ("local", LOCAL_TERMS), ("labels", LABEL_SOURCES)):
        assert set(typing.get_args(hints[key])) == set(table), key
    with pytest.raises(ValueError, match="loss.local: no such kind 'softmax'"):
        make_loss(local="softmax")  # a LossConfig built in code skips the reader's type check


def test_forward_refusals_name_the_problem():
    batch = make_batch()
    with pytest.raises(ValueError, match="img_l"):
        make_loss()({k: v for k, v in batch.items() if k != "img_l"})
    with pytest.raises(ValueError, match="caption_concepts"):
        make_loss()({k: v for k, v in batch.items() if k != "caption_concepts"})
    with pytest.raises(ValueError, match="txt_g"):
        make_loss()({**batch, "txt_g": batch["txt_g"][:4]})
    with pytest.raises(ValueError, match="image_ids"):
        make_loss()({**batch, "image_ids": batch["image_ids"].float()})
    with pytest.raises(ValueError, match="row_offset"):
        make_loss()(batch, row_offset=4, num_rows=3)
    with pytest.raises(ValueError, match="concept_logits"):
        make_loss(concept_bce_weight=1.0)(batch)
    with pytest.raises(ValueError, match="caption_logits"):
        make_loss(concept_bce_weight=1.0)(batch, concept_logits=(torch.zeros(6, 5), torch.zeros(6, 4)))
    with pytest.raises(ValueError, match="concept_logits"):
        make_loss()(batch, concept_logits=(torch.zeros(6, 5), torch.zeros(6, 5)))
    minimal = {k: batch[k] for k in ("img_g", "txt_g", "image_ids")}  # all that global-only, label-free needs
    assert torch.isfinite(make_loss(local="none", labels="none")(minimal)["loss"])


def ref_contrastive_label_mass(rows, cols, ids, labels, temperature, mass):
    """label_mass: the own picture's columns share 1 - mass equally, the others share mass by their labels."""
    n = len(rows)
    total = 0
    for i in range(n):
        logits = [ref_dot(rows[i], cols[j]) / temperature for j in range(n)]
        own = [j for j in range(n) if ids[j] == ids[i]]
        other_sum = sum(labels[i][j] for j in range(n) if ids[j] != ids[i])
        share = mass if other_sum > 0 else 0.0
        weights = [(1 - share) / len(own) if ids[j] == ids[i]
                   else share * labels[i][j] / other_sum if other_sum else 0.0
                   for j in range(n)]
        log_z = torch.log(sum(torch.exp(x) for x in logits))
        total = total - sum(weights[j] * (logits[j] - log_z) for j in range(n))
    return total / n


@pytest.mark.parametrize("mass", [0.0, 0.3, 0.9])
def test_label_mass_targets_match_reference(mass):
    batch = make_batch()
    out = make_loss(local="contrastive", temperature=0.1, label_mass=mass)(batch)
    ids = batch["image_ids"].tolist()
    img_c, cap_c = batch["image_concepts"].tolist(), batch["caption_concepts"].tolist()
    y_i2t = [[ref_jaccard(img_c[i], cap_c[j]) for j in range(6)] for i in range(6)]
    y_t2i = [[ref_jaccard(cap_c[i], img_c[j]) for j in range(6)] for i in range(6)]
    assert_same(out["local_i2t"], ref_contrastive_label_mass(batch["img_l"], batch["txt_l"], ids, y_i2t, 0.1, mass),
                batch)
    assert_same(out["local_t2i"], ref_contrastive_label_mass(batch["txt_l"], batch["img_l"], ids, y_t2i, 0.1, mass),
                batch)
    if mass == 0.0:  # no label mass: plain contrastive with the own picture's columns as positives
        plain = make_loss(local="contrastive", temperature=0.1, labels="none")(batch)
        assert torch.allclose(out["local"], plain["local"], **TOL)


def test_label_mass_keeps_the_positive_share_as_the_batch_grows():
    """docs/design.md's rule gives the positive 1 / (1 + sum of labels); label_mass keeps it at 1 - m."""
    def positive_share(n, mass):
        # At uniform logits d(loss)/d(logit_ij) = (1/n - target_ij) / n, so the gradient reveals the target.
        logits = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
        labels = torch.full((n, n), 0.2, dtype=torch.float64)
        soft_contrastive(logits, torch.eye(n, dtype=torch.bool), labels, 1.0, mass).backward()
        target = 1 / n - logits.grad * n
        assert torch.allclose(target.sum(1), torch.ones(n, dtype=torch.float64))
        return float(target[0, 0])

    for n in (8, 512):
        assert positive_share(n, None) == pytest.approx(1 / (1 + 0.2 * (n - 1)))
        assert positive_share(n, 0.3) == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------- labels in the global term
def ref_containment(caption_row, image_row) -> float:
    """Share of the caption's concepts that the picture has (0 for a caption without concepts)."""
    cap = {k for k, v in enumerate(caption_row) if v > 0}
    img = {k for k, v in enumerate(image_row) if v > 0}
    return len(cap & img) / len(cap) if cap else 0.0


def ref_label_hinge(rows, cols, ids, match, margin, exclude_above, scale_margin):
    """ref_hinge with margin * (1 - match) and the columns with match >= exclude_above left out."""
    n = len(rows)
    per_row = []
    for i in range(n):
        positive = ref_dot(rows[i], cols[i])
        costs = [ref_relu(margin * ((1 - match[i][j]) if scale_margin else 1) - positive + ref_dot(rows[i], cols[j]))
                 for j in range(n) if ids[j] != ids[i] and not (exclude_above is not None
                                                               and match[i][j] >= exclude_above)]
        per_row.append(max(costs) if costs else 0 * positive)
    return sum(per_row) / n


def duplicate_caption_batch():
    """Picture 0 (a red star and a blue ring) and picture 1 (a red star) both have the caption "a red star":
    identical caption vectors; picture 2 is unrelated. Concepts: 0 red, 1 star, 2 blue, 3 ring, 4 green."""
    e = torch.eye(3, dtype=torch.float64)
    img = torch.stack([e[0], F.normalize(e[0] + e[1], dim=0), e[2]])
    red_star = F.normalize(e[0] + 0.3 * e[1], dim=0)
    txt = torch.stack([red_star, red_star, F.normalize(e[2] + 0.5 * e[0], dim=0)])
    img_c = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float64)
    cap_c = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float64)
    return {"img_g": img, "txt_g": txt, "image_ids": torch.arange(3), "image_concepts": img_c,
            "caption_concepts": cap_c}


def test_caption_containment_hand_computed():
    cap = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.float64)
    img = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.5], [0.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    size = cap.sum(1)
    assert torch.allclose(caption_containment(cap, size, img, caption_rows=True), expected)
    assert torch.allclose(caption_containment(cap, size, img, caption_rows=False), expected.T)


def test_duplicate_caption_is_not_the_hardest_negative_when_excluded():
    batch = duplicate_caption_batch()
    plain = make_loss(local="none")(batch)
    # image 0's own caption and picture 1's caption are the same vector: plain VSE++ pays the full margin
    s = batch["img_g"] @ batch["txt_g"].T
    assert torch.isclose(s[0, 0], s[0, 1])
    row0_plain = max(0.2 - s[0, 0] + s[0, 1], 0.2 - s[0, 0] + s[0, 2]).clamp(min=0)
    excluded = make_loss(local="none", global_exclude_above=1.0)(batch)
    # with "a red star" fully contained in picture 0, only column 2 is left as image 0's negative
    row0_excluded = (0.2 - s[0, 0] + s[0, 2]).clamp(min=0)
    assert row0_excluded < row0_plain - 0.05
    # "a red star" of picture 0 fits picture 1 as well: (1, 0) is left out too; row 1 keeps only column 2
    s_row = [max(float(0.2 - s[i, i] + s[i, j]) for j in range(3) if j != i and {i, j} != {0, 1})
             for i in range(3)]
    assert torch.allclose(excluded["global_i2t"], torch.tensor([max(v, 0.0) for v in s_row]).double().mean(), **TOL)
    assert excluded["global_i2t"] < plain["global_i2t"]
    # shuffled labels move the exclusion to whatever pictures the permutation pairs up
    perm = shuffle_permutation(3, seed=0, step=0)
    assert not torch.equal(perm, torch.arange(3))
    shuffled = make_loss(local="none", labels="shuffled", global_exclude_above=1.0)(batch)
    permuted = {**batch, "image_concepts": batch["image_concepts"][perm],
                "caption_concepts": batch["caption_concepts"][perm]}
    same = make_loss(local="none", global_exclude_above=1.0)(permuted)
    assert torch.allclose(shuffled["global"], same["global"], **TOL)


@pytest.mark.parametrize("exclude_above, scale_margin", [(None, True), (1.0, False), (0.5, True)])
def test_label_hinge_matches_reference(exclude_above, scale_margin):
    batch = make_batch(seed=2)
    loss_fn = make_loss(local="contrastive", margin=0.3, global_label_margin=scale_margin,
                               global_exclude_above=exclude_above)
    out = loss_fn(batch, step=1)
    ids = batch["image_ids"].tolist()
    img_c, cap_c = batch["image_concepts"].tolist(), batch["caption_concepts"].tolist()
    n = len(ids)
    match_i2t = [[ref_containment(cap_c[j], img_c[i]) for j in range(n)] for i in range(n)]
    match_t2i = [[ref_containment(cap_c[i], img_c[j]) for j in range(n)] for i in range(n)]
    assert any(0 < m < 1 for r in match_i2t for m in r) and any(m == 1 for r in match_i2t for m in r)
    ref_i2t = ref_label_hinge(batch["img_g"], batch["txt_g"], ids, match_i2t, 0.3, exclude_above, scale_margin)
    ref_t2i = ref_label_hinge(batch["txt_g"], batch["img_g"], ids, match_t2i, 0.3, exclude_above, scale_margin)
    assert_same(out["global_i2t"], ref_i2t, batch)
    assert_same(out["global_t2i"], ref_t2i, batch)


def ref_info_nce(rows, cols, ids, match, temperature, exclude_above):
    n = len(rows)
    total = 0
    for i in range(n):
        keep = [j for j in range(n) if ids[j] == ids[i] or exclude_above is None or match[i][j] < exclude_above]
        logits = {j: ref_dot(rows[i], cols[j]) / temperature for j in keep}
        log_z = torch.log(sum(torch.exp(x) for x in logits.values()))
        own = [j for j in keep if ids[j] == ids[i]]
        total = total - sum(logits[j] - log_z for j in own) / len(own)
    return total / n


@pytest.mark.parametrize("exclude_above", [None, 1.0])
def test_info_nce_matches_reference(exclude_above):
    batch = make_batch(seed=3)
    out = make_loss(global_loss="infonce", global_temperature=0.2, global_exclude_above=exclude_above)(batch)
    ids = batch["image_ids"].tolist()
    img_c, cap_c = batch["image_concepts"].tolist(), batch["caption_concepts"].tolist()
    n = len(ids)
    match_i2t = [[ref_containment(cap_c[j], img_c[i]) for j in range(n)] for i in range(n)]
    match_t2i = [[ref_containment(cap_c[i], img_c[j]) for j in range(n)] for i in range(n)]
    assert_same(out["global_i2t"], ref_info_nce(batch["img_g"], batch["txt_g"], ids, match_i2t, 0.2, exclude_above),
                batch)
    assert_same(out["global_t2i"], ref_info_nce(batch["txt_g"], batch["img_g"], ids, match_t2i, 0.2, exclude_above),
                batch)
    assert torch.isfinite(out["loss"])


def test_global_label_options_refused_without_labels():
    with pytest.raises(ConfigError, match="loss.global_exclude_above: needs labels"):
        LossConfig(labels="none", global_exclude_above=1.0)
    with pytest.raises(ConfigError, match="infonce"):
        LossConfig(global_loss="infonce", global_label_margin=True)
    with pytest.raises(ConfigError, match="loss.global_exclude_above"):
        LossConfig(global_exclude_above=1.5)


# ----------------------------------------------------------------------------------------- soft hardest negative
def ref_soft_hinge(rows, cols, ids, margin, temperature, excluded=None):
    """mean_i of t * log(mean_j exp([margin - <r_i, c_i> + <r_i, c_j>]_+ / t)) over the negatives j of row i."""
    n = len(rows)
    per_row = []
    for i in range(n):
        positive = ref_dot(rows[i], cols[i])
        costs = [ref_relu(margin - positive + ref_dot(rows[i], cols[j])) for j in range(n)
                 if ids[j] != ids[i] and not (excluded and excluded[i][j])]
        if not costs:
            per_row.append(0 * positive)
        else:
            per_row.append(temperature * torch.log(sum(torch.exp(c / temperature) for c in costs) / len(costs)))
    return sum(per_row) / n


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_soft_hardest_negative_matches_reference(temperature):
    batch = make_batch(seed=4)
    out = make_loss(local="none", margin=0.3, global_hardest_temperature=temperature)(batch, step=1)
    ids = batch["image_ids"].tolist()
    assert_same(out["global_i2t"], ref_soft_hinge(batch["img_g"], batch["txt_g"], ids, 0.3, temperature), batch)
    assert_same(out["global_t2i"], ref_soft_hinge(batch["txt_g"], batch["img_g"], ids, 0.3, temperature), batch)


def test_soft_hardest_negative_lies_between_mean_and_max_and_tends_to_the_max():
    batch = make_batch(seed=5)
    hardest = make_loss(local="none")(batch)["global"]
    summed = make_loss(local="none", hinge_warmup_steps=10)(batch)["global"]  # the sum, before the switch
    cold = make_loss(local="none", global_hardest_temperature=1e-3)(batch)["global"]
    warm = make_loss(local="none", global_hardest_temperature=0.1)(batch)["global"]
    assert warm < cold <= hardest + 1e-9 < summed
    assert torch.isclose(cold, hardest, atol=0.02)
    # the max sends a row's gradient to one column; the soft max to every violating one
    scores = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    own = torch.eye(5, dtype=torch.bool)
    for temperature, columns_per_row in ((None, 1), (0.1, 4)):
        value = hinge(scores, scores.diagonal(), own, 2.0, use_sum=False, hardest_temperature=temperature)
        grad = torch.autograd.grad(value, scores)[0].masked_fill(own, 0)
        assert ((grad != 0).sum(1) == columns_per_row).all()


def test_soft_hardest_negative_with_excluded_columns_and_rows_without_negatives():
    batch = duplicate_caption_batch()
    out = make_loss(local="none", global_exclude_above=1.0, global_hardest_temperature=0.1)(batch)
    s = batch["img_g"] @ batch["txt_g"].T
    excluded = [[i != j and {i, j} == {0, 1} for j in range(3)] for i in range(3)]
    ref = ref_soft_hinge(batch["img_g"], batch["txt_g"], [0, 1, 2], 0.2, 0.1, excluded)
    assert torch.allclose(out["global_i2t"], ref, **TOL) and s.shape == (3, 3)
    one_picture = {**make_batch(), "image_ids": torch.zeros(6, dtype=torch.int64)}
    none_left = make_loss(local="none", global_hardest_temperature=0.1)(one_picture)
    assert none_left["global"] == 0
    assert all(torch.isfinite(g).all() for g in grads(none_left["loss"], one_picture))


def test_soft_hardest_negative_config_is_checked():
    for bad in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="loss.global_hardest_temperature: must be null or positive"):
            LossConfig(global_hardest_temperature=bad)
    with pytest.raises(ConfigError, match="loss.global_hardest_temperature: softens the hinge"):
        LossConfig(global_loss="infonce", global_hardest_temperature=0.05)
