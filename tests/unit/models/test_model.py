"""Tests of trainer.models (embedder, heads, pooling, image towers, configs): shapes and norms, masking, GPO, the
retrieval vector, gradients, fixed module calls, the tower registry, and the config rules the model relies on."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ConfigError, load_config
from trainer.models import image_towers
from trainer.models.configs import EmbedderConfig, ImageTowerConfig, TextTowerConfig, share_of_weight
from trainer.models.embedder import HierarchicalEmbedder
from trainer.models.gru_text import GRUTextEncoder
from trainer.models.image_towers import SmallCNN, build_image_tower, register_image_tower
from trainer.models.pooling import GPOPool, MeanPool, build_pooling
from trainer.training.loop import load_init_weights

VOCAB = 40
CONCEPTS = 7
SPACES = EmbedderConfig(embed_dim=16, max_words=10)
ATOL = 1e-5  # fp32 rounding between two computations in one process (batching, padding): any CPU


def tiny_model(image_encoder: str = "small_cnn", concept_head: bool = False, **spaces) -> HierarchicalEmbedder:
    """A small CNN (or `image_encoder`) and a GRU under the heads of SPACES with `spaces` changed."""
    torch.manual_seed(0)
    image = build_image_tower(ImageTowerConfig(kind=image_encoder, image_size=16, cnn_width=8))
    text = GRUTextEncoder(VOCAB, word_dim=8, hidden=12, layers=1)
    config = dataclasses.replace(SPACES, num_concepts=CONCEPTS if concept_head else 0, **spaces)
    return HierarchicalEmbedder(config, image, text).eval()


def batch(lengths: list[int], width: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    images = torch.randn(len(lengths), 3, 16, 16, generator=gen)
    tokens = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    lengths_t = torch.tensor(lengths)
    tokens[torch.arange(width).unsqueeze(0) >= lengths_t.unsqueeze(1)] = 0
    return images, tokens, lengths_t


# ---------------------------------------------------------------------------------------------- shapes, norms


@pytest.mark.parametrize("local_space,concept_head,pooling", [
    (True, True, "gpo"), (True, False, "gpo"), (False, False, "gpo"), (True, True, "mean"), (False, False, "mean"),
])
def test_output_keys_shapes_and_unit_norms(local_space, concept_head, pooling):
    m = tiny_model(local_space=local_space, concept_head=concept_head, pooling=pooling)
    images, tokens, lengths = batch([3, 1, 5])
    out = m(images, tokens, lengths)
    expected = {"img_g", "txt_g"} | ({"img_l", "txt_l"} if local_space else set())
    expected |= {"img_concept_logits", "txt_concept_logits"} if concept_head else set()
    assert set(out) == expected
    for key in expected - {"img_concept_logits", "txt_concept_logits"}:
        assert out[key].shape == (3, 16), key
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(3), atol=ATOL), key
    for key in {"img_concept_logits", "txt_concept_logits"} & expected:
        assert out[key].shape == (3, CONCEPTS)
    g, l = m.encode_image(images)
    assert torch.allclose(g, out["img_g"]) and (l is None) == (not local_space)


def test_concept_logits_are_scaled_inner_products_with_the_concept_matrix():
    m = tiny_model(concept_head=True)
    with torch.no_grad():
        m.concept_head.bias.copy_(torch.arange(CONCEPTS, dtype=torch.float32))
    out = m(*batch([2, 4]))
    head = m.concept_head
    assert head.scale.item() == 10.0
    for side in ("img", "txt"):
        expected = 10.0 * out[f"{side}_l"] @ head.concepts.t() + torch.arange(CONCEPTS)
        assert torch.allclose(out[f"{side}_concept_logits"], expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("pooling", ["gpo", "mean"])
def test_caption_padding_and_garbage_past_length_do_not_change_the_embedding(pooling):
    m = tiny_model(pooling=pooling)
    _, tokens, lengths = batch([4, 2])
    g, l = m.encode_text(tokens, lengths)
    padded = F.pad(tokens, (0, 5))
    garbage = padded.clone()
    garbage[0, 4:] = torch.arange(1, 6)
    garbage[1, 2:] = torch.arange(11, 18)
    for variant in (padded, garbage):
        g2, l2 = m.encode_text(variant, lengths)
        assert torch.allclose(g, g2, atol=ATOL) and torch.allclose(l, l2, atol=ATOL)


@pytest.mark.parametrize("pooling", ["gpo", "mean"])
def test_embeddings_do_not_depend_on_other_samples_in_the_batch(pooling):
    m = tiny_model(pooling=pooling).train()  # train mode: batch statistics, if any, would show up here
    images, tokens, lengths = batch([3, 9, 1, 6])
    together = m(images, tokens, lengths)
    for i in range(4):
        alone = m(images[i:i + 1], tokens[i:i + 1, : lengths[i]], lengths[i:i + 1])
        for key in alone:
            assert torch.allclose(alone[key][0], together[key][i], atol=ATOL), (key, i)


def test_gpo_of_one_part_returns_that_part_after_the_head():
    m = tiny_model()
    _, tokens, lengths = batch([1, 1, 1])
    g, _ = m.encode_text(tokens, lengths)
    parts = m.text_encoder(tokens, lengths)
    assert torch.allclose(g, F.normalize(m.text_global.project(parts)[:, 0], dim=-1), atol=ATOL)

    pool = GPOPool(max_len=6)
    parts = torch.randn(2, 6, 5)
    assert torch.allclose(pool(parts, torch.tensor([1, 1])), parts[:, 0], atol=ATOL)


def test_gpo_is_invariant_to_permuting_valid_parts_and_ignores_padding():
    torch.manual_seed(0)
    pool = GPOPool(max_len=8)
    parts = torch.randn(3, 8, 5)
    lengths = torch.tensor([5, 8, 2])
    reference = pool(parts, lengths)
    permuted = parts.clone()
    for i, n in enumerate(lengths.tolist()):
        permuted[i, :n] = parts[i, torch.randperm(n)]
    assert torch.allclose(pool(permuted, lengths), reference, atol=ATOL)
    repadded = parts.clone()
    repadded[0, 5:] = 1e4
    repadded[2, 2:] = float("nan")
    assert torch.allclose(pool(repadded, lengths), reference, atol=ATOL)
    # a batch narrower than max_len (text padded to its longest caption) pools the same
    narrow = torch.tensor([2, 1])
    assert torch.allclose(pool(parts[[2, 0], :3], narrow), pool(parts[[2, 0]], narrow), atol=ATOL)


def test_gpo_weights_are_a_distribution_over_the_valid_sorted_positions():
    pool = GPOPool(max_len=6)
    table = pool.weight_table()
    assert table.shape == (6, 6)
    assert torch.allclose(table.sum(dim=1), torch.ones(6), atol=ATOL)
    assert torch.all(table.triu(diagonal=1) == 0)  # row L-1 has L valid positions
    parts = torch.randn(2, 6, 3)
    ordered = parts.sort(dim=1, descending=True).values
    assert torch.allclose(pool(parts, torch.tensor([6, 6])), (ordered * table[5, :, None]).sum(1), atol=ATOL)


def test_mean_pooling_averages_only_valid_parts():
    parts = torch.randn(2, 4, 3)
    parts[0, 2:] = float("nan")
    pooled = MeanPool()(parts, torch.tensor([2, 4]))
    assert torch.allclose(pooled, torch.stack([parts[0, :2].mean(0), parts[1].mean(0)]))


# ---------------------------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("share", [0.5, 1 / 3, 2 / 3, 0.0, 1.0])
def test_retrieval_vector_inner_product_mixes_the_spaces_by_the_local_share(share):
    m = tiny_model(local_share=share)
    out = m(*batch([3, 5, 2]))
    v_img = m.retrieval_vector(out["img_g"], out["img_l"])
    v_txt = m.retrieval_vector(out["txt_g"], out["txt_l"])
    assert v_img.shape == (3, 32)
    assert torch.allclose(v_img.norm(dim=1), torch.ones(3), atol=ATOL)  # unit vectors: a dot product is a cosine
    expected = (1 - share) * out["img_g"] @ out["txt_g"].t() + share * out["img_l"] @ out["txt_l"].t()
    assert torch.allclose(v_img @ v_txt.t(), expected, atol=ATOL)
    m.local_share = 0.25  # set after training (chosen on validation, or read from the run): the vectors follow
    assert torch.allclose(m.retrieval_vector(out["img_g"], out["img_l"])[:, :16], math.sqrt(0.75) * out["img_g"])


@pytest.mark.parametrize("weight,share", [(1.0, 0.5), (2.0, 2 / 3), (0.0, 0.0), (0.25, 0.2), ("auto", 0.5)])
def test_the_model_starts_with_the_share_of_the_configured_weight(weight, share):
    cfg = load_config(None, [f"model.local_score_weight={weight}"], check_paths=False)
    assert EmbedderConfig.from_config(cfg, num_concepts=0).local_share == pytest.approx(share)
    assert share_of_weight(math.inf) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        share_of_weight(-1.0)


def test_init_from_takes_the_share_the_exported_run_chose(tmp_path):
    """model.init_from: model.pt's concat_weight becomes the starting share under auto; a fixed weight keeps its own."""
    path = tmp_path / "model.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "concat_weight": {"local_share": 0.9}}, path)
    started = tiny_model(local_share=0.5)
    load_init_weights(started, str(path))
    assert started.local_share == 0.9
    fixed = tiny_model(local_share=0.2)
    load_init_weights(fixed, str(path), keep_share=True)
    assert fixed.local_share == 0.2
    torch.save({"state_dict": tiny_model().state_dict()}, path)  # exported before the share was carried
    older = tiny_model(local_share=0.5)
    load_init_weights(older, str(path))
    assert older.local_share == 0.5


def test_retrieval_vector_without_local_space_is_the_global_vector():
    m = tiny_model(local_space=False)
    g, l = m.encode_image(batch([1])[0])
    assert l is None and m.retrieval_vector(g, None) is g
    with pytest.raises(ValueError, match="no local space"):
        m.retrieval_vector(g, g)
    with pytest.raises(ValueError, match="needs the local vector"):
        tiny_model().retrieval_vector(g, None)


# ---------------------------------------------------------------------------------------------- training path


def test_gradients_reach_every_parameter():
    m = tiny_model(concept_head=True).train()
    out = m(*batch([3, 7, 1, 10]))
    gen = torch.Generator().manual_seed(3)
    loss = sum((value * torch.randn(value.shape, generator=gen)).sum() for value in out.values())
    loss.backward()
    for name, param in m.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_batch_norm_anywhere():
    m = tiny_model(concept_head=True)
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in m.modules())
    assert any(isinstance(module, nn.GroupNorm) for module in m.image_encoder.modules())


def _shape_of(gru_input) -> list:
    """Packed input (text: every length 1..max_len): its batch sizes; plain input (image grid): its shape."""
    sizes = getattr(gru_input, "batch_sizes", None)
    return sizes.tolist() if sizes is not None else list(gru_input.shape)


@pytest.mark.parametrize("pooling", ["gpo", "mean"])
def test_every_module_runs_once_per_forward_whatever_the_lengths(pooling):
    m = tiny_model(pooling=pooling, concept_head=True)
    calls: dict[str, int] = {}
    for name, module in m.named_modules():
        if name:
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    gpo_grus = [name for name, module in m.named_modules() if isinstance(module, GPOPool)]
    assert len(gpo_grus) == (4 if pooling == "gpo" else 0)
    gru_inputs: list[tuple] = []  # the GPO GRUs must see one fixed batch (lengths 1..max_len), not the data's
    for name in gpo_grus:
        m.get_submodule(name).gru.register_forward_hook(
            lambda module, inputs, output: gru_inputs.append((module, _shape_of(inputs[0]))))
    sequences, gru_input_sets = [], []
    for lengths in ([1, 1, 1], [10, 3, 7, 1], [5], [10, 10]):
        calls.clear()
        gru_inputs.clear()
        m(*batch(lengths))
        sequences.append(dict(calls))
        gru_input_sets.append(list(gru_inputs))
        for name in gpo_grus:
            assert calls[f"{name}.gru"] == 1, (name, lengths)
    assert all(seq == sequences[0] for seq in sequences)
    assert all(inputs == gru_input_sets[0] for inputs in gru_input_sets)
    assert set(sequences[0]) == {name for name, _ in m.named_modules() if name}
    assert set(sequences[0].values()) == {1}  # every module exactly once


# ---------------------------------------------------------------------------------------------- image encoder


def test_small_cnn_grid_and_coordinate_channels():
    encoder = build_image_tower(ImageTowerConfig(kind="small_cnn", image_size=32, cnn_width=8))
    assert isinstance(encoder, SmallCNN)
    assert encoder.num_parts == 16 and encoder.out_dim == 8
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 16, 8)
    assert encoder.features[0][0].in_channels == 5
    x, y = encoder.coords[0]
    assert torch.allclose(x[0], torch.linspace(-1, 1, 32)) and torch.all(x == x[0])
    assert torch.allclose(y[:, 0], torch.linspace(-1, 1, 32)) and torch.all(y.t() == y[:, 0])
    # the coordinates carry position: zeroing their weights changes the output of a uniform picture
    uniform = torch.zeros(1, 3, 32, 32)
    before = encoder(uniform)
    with torch.no_grad():
        encoder.features[0][0].weight[:, 3:] = 0
    assert not torch.allclose(before, encoder(uniform))


def test_image_tower_registry_builds_registered_towers_from_their_config(monkeypatch):
    monkeypatch.setattr(image_towers, "IMAGE_TOWERS", dict(image_towers.IMAGE_TOWERS))
    seen = []

    @register_image_tower("mean_colour")
    class MeanColour(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_parts, self.out_dim = 1, 3
            self.scale = nn.Parameter(torch.ones(3))

        @classmethod
        def from_config(cls, config: ImageTowerConfig) -> MeanColour:
            seen.append(config)
            return cls()

        def forward(self, images):
            return (images.mean(dim=(2, 3)) * self.scale).unsqueeze(1)

    m = tiny_model(image_encoder="mean_colour")
    assert isinstance(m.image_encoder, MeanColour) and seen[0].kind == "mean_colour"
    assert m(*batch([2, 3]))["img_g"].shape == (2, 16)
    with pytest.raises(ValueError, match="already registered"):
        register_image_tower("mean_colour")(MeanColour)


def test_tower_configs_carry_the_flat_model_keys_to_the_tower_that_uses_them():
    cfg = load_config(None, ["model.image_encoder=regions", "model.region_dim=12", "model.max_regions=5",
                             "model.region_dropout=0.1", "data.image_size=32", "data.max_words=9",
                             "model.word_dim=24", "model.gru_hidden=20", "model.gru_layers=2", "model.embed_dim=48",
                             "model.pooling=mean", "loss.local=none", "model.local_score_weight=0.5",
                             "optim.text_lr_mult=0.3"], check_paths=False)
    image = ImageTowerConfig.from_config(cfg)
    assert (image.kind, image.image_size, image.region_dim, image.max_regions, image.region_dropout) == \
        ("regions", 32, 12, 5, 0.1)
    text = TextTowerConfig.from_config(cfg, vocab_size=30)
    assert (text.kind, text.vocab_size, text.max_words, text.word_dim, text.gru_hidden, text.gru_layers,
            text.lr_mult) == ("gru", 30, 9, 24, 20, 2, 0.3)
    spaces = EmbedderConfig.from_config(cfg, num_concepts=4)
    assert spaces == EmbedderConfig(embed_dim=48, max_words=9, pooling="mean", local_space=False,
                                    local_share=1 / 3, num_concepts=0)  # no concept loss: no concept head
    tower = build_image_tower(image)
    assert (tower.out_dim, tower.num_parts, tower.region_dropout) == (12, 5, 0.1)
    with_concepts = load_config(None, ["loss.concept_bce_weight=0.5"], check_paths=False)
    assert EmbedderConfig.from_config(with_concepts, num_concepts=4).num_concepts == 4
    with pytest.raises(ConfigError, match="loss.concept_bce_weight: the shard set lists no concepts"):
        EmbedderConfig.from_config(with_concepts, num_concepts=0)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("override,key", [
    ("model.image_encoder=resnet9000", "model.image_encoder"),
    ("model.pooling=max", "model.pooling"),
    ("model.embed_dim=-1", "model.embed_dim"),
    ("model.cnn_width=0", "model.cnn_width"),
    ("model.cnn_width=6", "model.cnn_width"),
    ("data.image_size=0", "data.image_size"),
    ("data.image_size=20", "data.image_size"),
    ("model.word_dim=0", "model.word_dim"),
    ("model.gru_hidden=0", "model.gru_hidden"),
    ("model.gru_layers=0", "model.gru_layers"),
    ("data.max_words=0", "data.max_words"),
    ("model.local_score_weight=-0.5", "model.local_score_weight"),
    ("model.local_score_weight=.nan", "model.local_score_weight"),
    ("model.local_score_weight=.inf", "model.local_score_weight"),
    ("model.local_score_weight=atuo", "model.local_score_weight"),
    ("model.local_score_weight=true", "model.local_score_weight"),
    ("model.region_dim=0", "model.region_dim"),
    ("model.max_regions=0", "model.max_regions"),
    ("model.region_dropout=1.0", "model.region_dropout"),
    ("model.backbone_trainable=some", "model.backbone_trainable"),
    ("model.backbone_trainable_blocks=17", "model.backbone_trainable_blocks"),
])
def test_the_model_rules_are_the_configs_and_name_the_key(override, key):
    """The model code does not check these again: the config refuses them once, naming the key."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override], check_paths=False)


def test_a_direct_caller_gets_a_named_error_where_the_model_would_misbehave():
    with pytest.raises(ValueError, match="num_concepts needs local_space"):
        tiny_model(concept_head=True, local_space=False)
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_pooling("max", 4)
    with pytest.raises(ValueError, match="image_encoder must be one of"):
        build_image_tower(ImageTowerConfig(kind="resnet9000"))
    with pytest.raises(ValueError, match="image_size must be a multiple of 8"):
        SmallCNN(image_size=20, cnn_width=8)
    with pytest.raises(ValueError, match="pe_dim must be even"):
        GPOPool(4, pe_dim=5)


def test_bad_inputs_are_refused():
    m = tiny_model()
    images, tokens, _ = batch([3, 2])
    with pytest.raises(ValueError, match="caption 1 has length 0"):
        m.encode_text(tokens, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="caption 0 has length 4"):
        m.encode_text(tokens, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="max_words=10"):
        m.encode_text(torch.ones(1, 12, dtype=torch.long), torch.tensor([11]))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 16, 16\]"):
        m.encode_image(torch.zeros(2, 3, 32, 32))


def test_fixed_length_gpo_equals_the_full_length_row_of_the_table():
    torch.manual_seed(0)
    variable = GPOPool(6)
    fixed = GPOPool(6, variable_length=False)
    fixed.load_state_dict(variable.state_dict())
    parts = torch.randn(3, 6, 5)
    full = torch.full((3,), 6)
    torch.testing.assert_close(fixed(parts, full), variable(parts, full))
    assert fixed.weight_table().shape == (1, 6)
    with pytest.raises(ValueError, match="exactly 6 parts"):
        fixed(torch.randn(3, 5, 5), full)


def test_bf16_autocast_runs_encoders_in_bf16_and_pooling_norm_and_concepts_in_fp32():
    torch.manual_seed(0)
    m = tiny_model(concept_head=True)
    images, tokens, lengths = batch([3, 1, 4])
    reference = m(images, tokens, lengths)
    m.autocast_dtype = torch.bfloat16  # what engine.precision=bf16 builds (trainer.training.factory.autocast_dtype)
    seen = {}
    m.image_global.project.register_forward_hook(lambda mod, i, o: seen.update(projection=o.dtype))
    m.text_global.pool.register_forward_hook(lambda mod, i, o: seen.update(pool_in=i[0].dtype, pool=o.dtype))
    out = m(images, tokens, lengths)
    assert seen == {"projection": torch.bfloat16, "pool_in": torch.float32, "pool": torch.float32}
    # the exported vectors and the concept logits are fp32: the loss's n x N scores are computed from them
    assert all(v.dtype == torch.float32 for v in out.values())
    for key in ("img_g", "txt_g", "img_l", "txt_l"):  # unit vectors: bf16's 8-bit mantissa, a few 1e-2 at most
        torch.testing.assert_close(out[key], reference[key], atol=0.05, rtol=0)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(3), atol=1e-5)  # normalised in fp32
    sum(v.sum() for v in out.values()).backward()
    # parameters stay fp32 (the master weights) and get fp32 gradients
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in m.parameters())
