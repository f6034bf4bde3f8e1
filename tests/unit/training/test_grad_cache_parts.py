"""The pieces of gradient caching that need no process group: the labels' one-tensor packing (ids of any int64
value come back exactly), the RNG replay, and the surrogate whose gradient is the cached one. The whole step
against one big-batch step is tests/integration/test_grad_cache.py."""
import torch

from trainer.training.grad_cache import (
    CachedStep,
    RngState,
    embed_without_graph,
    pack_labels,
    replaying,
    surrogate_loss,
    unpack_labels,
)


def test_labels_pack_into_one_float_tensor_and_come_back_exactly():
    ids = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1, 65535, 65536], dtype=torch.long)
    concepts = (torch.rand(len(ids), 5) < 0.5).float()
    labels = {"image_ids": ids, "image_concepts": concepts, "caption_concepts": concepts.flip(0)}
    packed = pack_labels(labels)
    assert packed.dtype == torch.float32 and packed.shape == (len(ids), 5 + 5 + 4)
    back = unpack_labels(packed, labels)
    assert back.keys() == labels.keys()
    for key, value in labels.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def dropout_forward(micro: int) -> dict[str, torch.Tensor]:
    """A stand-in model: embeddings that depend on the RNG draws, like dropout's."""
    base = torch.full((3, 4), float(micro + 1))
    return {"img_g": torch.nn.functional.dropout(base, 0.5, training=True), "txt_g": base * torch.rand(3, 1)}


def test_replay_draws_what_the_first_forward_drew_and_leaves_the_rng_where_it_left_it():
    torch.manual_seed(3)
    cache = embed_without_graph(dropout_forward, 3, torch.device("cpu"), ("img_g", "txt_g"))
    after_first_pass = torch.get_rng_state()
    assert cache.rows == [3, 3, 3] and cache.outputs["img_g"].shape == (9, 4)
    for micro in range(3):
        torch.manual_seed(99)  # whatever happened in between
        with replaying(cache, micro):
            again = dropout_forward(micro)
        for key in ("img_g", "txt_g"):
            assert torch.equal(again[key], cache.outputs[key][cache.micro_rows(micro)]), (micro, key)
    assert torch.equal(torch.get_rng_state(), after_first_pass)


def test_surrogate_backward_gives_the_cached_gradient():
    out = {"img_g": torch.randn(2, 3, requires_grad=True), "txt_g": torch.randn(2, 3, requires_grad=True)}
    grads = {"img_g": torch.randn(4, 3), "txt_g": torch.randn(4, 3)}
    state = RngState.capture(torch.device("cpu"))
    cache = CachedStep({}, ("img_g", "txt_g"), [2, 2], [state, state], state, torch.device("cpu"), grads)
    surrogate_loss(cache, 1, out).backward()
    assert torch.equal(out["img_g"].grad, grads["img_g"][2:]) and torch.equal(out["txt_g"].grad, grads["txt_g"][2:])
