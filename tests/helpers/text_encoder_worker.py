"""Worker for tests/unit/models/test_text_encoders.py: the MiniLM text encoder built by the trainer, inside a DeepSpeed
engine of every ZeRO stage (one process, gloo), against the same model without DeepSpeed and the checkpoint itself.

    python tests/helpers/text_encoder_worker.py OUT.json

Writes {zeroN: {bert_vs_checkpoint, model_vs_plain (max abs differences), lrs (the engine's param-group learning
rates), partitioned (whether ZeRO-3 took the BERT weights out of the module)}}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from worker_exit import leave  # noqa: E402 (tests/helpers is on the path by now)

from trainer.config import load_config  # noqa: E402
from trainer.data.collate import pad_tokens  # noqa: E402
from trainer.distributed import init_distributed, shutdown  # noqa: E402
from trainer.engine.build import build_engine, deepspeed_config  # noqa: E402
from trainer.models.hf_text import load_text_transformer  # noqa: E402
from trainer.models.text_encoders import caption_tokenizer  # noqa: E402
from trainer.training.factory import build_model  # noqa: E402

CAPTIONS = ["a red star above a blue circle", "two dogs", "an unbelievably long caption, with punctuation"]
SHARDSET = SimpleNamespace(vocab=[None] * 40, num_concepts=12)  # all build_model reads besides the config


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_stage(zero: str, checkpoint_bert: torch.nn.Module, info) -> dict:
    cfg = load_config(None, [
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}", "data.batch_size=4",
        "data.max_words=16", "model.text_encoder=minilm", "model.embed_dim=32", "model.cnn_width=16",
        "data.image_size=32", "optim.lr=1e-3", "optim.text_lr_mult=0.1", "optim.warmup_steps=0"],
        check_paths=False)
    tokenizer = caption_tokenizer(cfg, SHARDSET.vocab)
    tokens, lengths = pad_tokens([tokenizer.encode(c) for c in CAPTIONS], tokenizer.pad_id)
    torch.manual_seed(0)
    plain = build_model(cfg, SHARDSET).eval()
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg, SHARDSET), deepspeed_config(cfg, info.world_size))
    model = engine.module.eval()
    word_embeddings = model.text_encoder.transformer.embeddings.word_embeddings.weight
    with torch.no_grad():
        expected_g, expected_l = plain.encode_text(tokens, lengths)
        got_g, got_l = model.encode_text(tokens, lengths)
        bert = model.text_encoder(tokens, lengths)
        reference = checkpoint_bert(tokens, lengths)
    return {
        "bert_vs_checkpoint": max_diff(bert, reference),
        "model_vs_plain": max(max_diff(got_g, expected_g), max_diff(got_l, expected_l)),
        "lrs": sorted({group["lr"] for group in engine.optimizer.param_groups}),
        "partitioned": word_embeddings.numel() == 0,  # ZeRO-3 leaves an empty tensor outside forward calls
    }


def main(out_path: str) -> int:
    info = init_distributed()
    torch.set_num_threads(1)
    try:
        checkpoint_bert = load_text_transformer("minilm", None, max_len=16)[0].eval()
        results = {zero: run_stage(zero, checkpoint_bert, info) for zero in ("zero0", "zero1", "zero2", "zero3")}
        Path(out_path).write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    leave(main(sys.argv[1]))  # results saved, group destroyed: see worker_exit
