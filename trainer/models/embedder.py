"""The hierarchical image-text embedder: two towers, global and local heads, the concept head.

Each modality yields a set of parts (CNN grid cells or regions from the image tower, caption words from the text
tower). Two heads per modality project the parts into the shared global and local spaces; each head pools its
parts (GPO by default) and L2-normalises, so a picture or a caption becomes (g, l). Retrieval scores with one
inner product of `retrieval_vector`s, unit vectors that mix the spaces with the local share a (`local_share`):
<[sqrt(1 - a) g_v; sqrt(a) l_v], [sqrt(1 - a) g_t; sqrt(a) l_t]> = (1 - a) <g_v, g_t> + a <l_v, l_t>.
a is not a parameter: it is set from the config (model.local_score_weight w fixes a = w / (1 + w)) or chosen on
the validation split after training (trainer.eval.concat_weight).

The towers come built (trainer.models.image_towers, trainer.models.text_encoders; trainer.training.factory
builds all three from the run's config), the heads from an `EmbedderConfig`:

    model = HierarchicalEmbedder(EmbedderConfig(embed_dim=256, max_words=32),
                                 build_image_tower(ImageTowerConfig()), GRUTextEncoder(vocab_size, 128, 256, 1))

DeepSpeed ZeRO-3 gathers each submodule's parameters when it is called, so every rank must call the same
modules in the same order on every step: nothing here skips or repeats a module depending on the data.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from trainer.models.configs import EmbedderConfig
from trainer.models.heads import ConceptHead, EmbeddingHead


class HierarchicalEmbedder(nn.Module):
    """Image and caption encoders into a shared global space and (optionally) a shared local space."""

    def __init__(self, config: EmbedderConfig, image_tower: nn.Module, text_tower: nn.Module,
                 autocast_dtype: torch.dtype | None = None):
        """image_tower: an image encoder of trainer.models.image_towers (`num_parts`, `out_dim`, optionally
        `variable_parts`); text_tower: a caption encoder with `out_dim` and forward(tokens, lengths) -> parts
        (trainer.models.gru_text, trainer.models.hf_text). autocast_dtype: torch.bfloat16 runs the towers and
        projections under autocast (parameters stay fp32, the optimizer's master copy); pooling, normalisation and
        everything after them stay fp32.

        Lengths (caption lengths, region counts) may come on the host: they are checked there, so a step on a
        GPU never waits for a device-to-host copy, and moved to the device where the device needs them."""
        super().__init__()
        # The config's rules (loss.concept_bce_weight needs loss.local) already refuse this; a direct caller would
        # otherwise fail in forward, on the missing local vectors.
        if config.num_concepts and not config.local_space:
            raise ValueError("num_concepts needs local_space: concept logits are computed from local vectors")
        self.local_space = config.local_space
        self.embed_dim = config.embed_dim
        # Not a buffer: the state dict (checkpoints, model.pt) keeps its keys; the run folder records the choice.
        self.local_share = float(config.local_share)
        self.autocast_dtype = autocast_dtype
        self.max_words = config.max_words
        # The attribute names are the state dict's key prefixes (checkpoints, exported model.pt files): they stay.
        self.image_encoder = image_tower
        self.text_encoder = text_tower
        num_parts = image_tower.num_parts
        # A grid has num_parts valid cells in every picture; a set of regions has between 1 and num_parts.
        self.variable_image_parts = bool(getattr(image_tower, "variable_parts", False))
        self.register_buffer("image_lengths", torch.tensor([num_parts]), persistent=False)
        # Built in this order (image global, text global, image local, text local): a seed gives the same weights
        # as it always did.
        image_dim, text_dim, variable = image_tower.out_dim, text_tower.out_dim, self.variable_image_parts
        self.image_global = EmbeddingHead(image_dim, config.embed_dim, config.pooling, num_parts, variable)
        self.text_global = EmbeddingHead(text_dim, config.embed_dim, config.pooling, config.max_words)
        self.image_local = EmbeddingHead(image_dim, config.embed_dim, config.pooling, num_parts, variable) \
            if config.local_space else None
        self.text_local = EmbeddingHead(text_dim, config.embed_dim, config.pooling, config.max_words) \
            if config.local_space else None
        self.concept_head = ConceptHead(config.num_concepts, config.embed_dim) if config.num_concepts else None

    def encode_image(self, images: Tensor, image_lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """images [B, 3, H, W] (grid encoders) or region features [B, R, D] with region counts image_lengths [B]
        (set encoders) -> (g, l), each L2-normalised [B, D]; l is None without a local space."""
        images = images.float()  # region features travel as float16 (half the copy); weights are fp32
        with self._autocast(images.device.type):
            if self.variable_image_parts:
                if image_lengths is None:
                    raise ValueError("this image encoder takes region features [B, R, D] with their region "
                                     "counts (image_lengths), not pictures")
                parts, lengths = self.image_encoder(images, image_lengths)
            else:
                if image_lengths is not None:
                    raise ValueError("image_lengths is only for region features; this image encoder takes "
                                     "pictures")
                parts = self.image_encoder(images)
                lengths = self.image_lengths.expand(parts.size(0))  # every grid cell is a valid part
            local = self.image_local(parts, lengths) if self.image_local is not None else None
            return self.image_global(parts, lengths), local

    def encode_text(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """tokens [B, T] right-padded with 0, lengths [B] -> (g, l), each L2-normalised [B, D]."""
        self._check_text(tokens, lengths)
        with self._autocast(tokens.device.type):
            parts = self.text_encoder(tokens, lengths)
            local = self.text_local(parts, lengths) if self.text_local is not None else None
            return self.text_global(parts, lengths), local

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                image_lengths: Tensor | None = None) -> dict[str, Tensor]:
        img_g, img_l = self.encode_image(images, image_lengths)
        txt_g, txt_l = self.encode_text(tokens, lengths)
        out = {"img_g": img_g, "txt_g": txt_g}
        if self.local_space:
            out.update(img_l=img_l, txt_l=txt_l)
        if self.concept_head is not None:
            # One call on both modalities: the same module calls every step, whatever the batch.
            with torch.autocast(img_l.device.type, enabled=False):  # a sigmoid's logits: fp32
                logits = self.concept_head(torch.cat([img_l, txt_l]))
            out.update(img_concept_logits=logits[: img_l.size(0)], txt_concept_logits=logits[img_l.size(0):])
        return out

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that start from pretrained weights (optim.backbone_lr_mult applies to them)."""
        encoder_params = getattr(self.image_encoder, "pretrained_parameters", None)
        return list(encoder_params()) if encoder_params is not None else []

    def set_backbone_grad(self, enabled: bool) -> None:
        """Whether a pretrained backbone computes gradients (False during optim.backbone_freeze_steps)."""
        if hasattr(self.image_encoder, "backbone_grad"):
            self.image_encoder.backbone_grad = enabled

    def retrieval_vector(self, g: Tensor, l: Tensor | None) -> Tensor:
        """The exported vector [sqrt(1 - a) g; sqrt(a) l] (a = local_share), whose inner products are
        (1 - a) <g_v, g_t> + a <l_v, l_t>: the concatenation that evaluation scores."""
        if not self.local_space:
            if l is not None:
                raise ValueError("retrieval_vector got a local vector but the model has no local space")
            return g
        if l is None:
            raise ValueError("retrieval_vector needs the local vector l: the model has a local space")
        return torch.cat([math.sqrt(1.0 - self.local_share) * g, math.sqrt(self.local_share) * l], dim=-1)

    def _check_text(self, tokens: Tensor, lengths: Tensor) -> None:
        if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [B, T] and lengths [B], got {list(tokens.shape)} and "
                             f"{list(lengths.shape)}")
        bad = (lengths < 1) | (lengths > min(tokens.size(1), self.max_words))
        if bool(bad.any()):
            sample = int(bad.nonzero()[0, 0])
            raise ValueError(f"caption {sample} has length {int(lengths[sample])}; lengths must lie in "
                             f"[1, min(T={tokens.size(1)}, max_words={self.max_words})]")
