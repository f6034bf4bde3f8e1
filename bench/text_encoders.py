"""Parameters and per-step CPU cost of the text encoders: the GRU against all-MiniLM-L6-v2 (model.text_encoder).

For each encoder, with configs/builtin.yaml otherwise: one real training batch from a shard set (tokenised by that
encoder's tokenizer), then forward + loss + backward + AdamW step of the whole model (no DeepSpeed), timed in
process CPU time on one thread so that other load on the machine does not count; the minimum over the steps
after a warm-up step is reported, with the text encoder alone (encode_text + backward + step) beside it.

    python bench/text_encoders.py --shards data/builtin --batch-size 32 --steps 5
"""
from __future__ import annotations

import argparse
import time

import torch

from trainer.config import load_config
from trainer.data.shardset import ShardSet
from trainer.data.stream import StreamSettings, TrainStream
from trainer.engine.build import param_groups
from trainer.models.text_encoders import caption_tokenizer
from trainer.training.factory import build_loss, build_model


def cpu_seconds(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def measure(encoder: str, shards: str, batch_size: int, steps: int) -> dict:
    cfg = load_config("configs/builtin.yaml", [f"data.shards={shards}", f"model.text_encoder={encoder}",
                                               f"data.batch_size={batch_size}"])
    shardset = ShardSet.open(shards)
    torch.manual_seed(0)
    model = build_model(cfg, shardset)
    loss_fn = build_loss(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.lr))
    d = cfg.data
    settings = StreamSettings(batch_size=batch_size, image_size=d.image_size, max_words=d.max_words,
                              shuffle_buffer=64, resampled=True, batches_per_worker=1, seed=0)
    stream = TrainStream(shardset, d.train_split, settings, rank=0, world_size=1,
                         tokenizer=caption_tokenizer(cfg, shardset.vocab))
    batch = next(iter(stream))

    def train_step() -> None:
        out = model(batch["images"], batch["tokens"], batch["lengths"])
        labels = {k: batch[k] for k in ("image_ids", "image_concepts", "caption_concepts")}
        loss_fn({**out, **labels}, step=10**6)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    def text_step() -> None:
        g, l = model.encode_text(batch["tokens"], batch["lengths"])
        (g.sum() + l.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    return {"encoder": encoder, "text_params_m": sum(p.numel() for p in model.text_encoder.parameters()) / 1e6,
            "model_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens": list(batch["tokens"].shape), "train_step_s": cpu_seconds(train_step, steps),
            "text_step_s": cpu_seconds(text_step, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/builtin", help="a shard set (python -m shards build)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("encoder  text params  model params  tokens     train step (CPU s)  text-only step (CPU s)")
    for encoder in ("gru", "minilm"):
        r = measure(encoder, args.shards, args.batch_size, args.steps)
        print(f"{r['encoder']:8s} {r['text_params_m']:9.2f}M {r['model_params_m']:11.2f}M  {str(r['tokens']):10s} "
              f"{r['train_step_s']:18.3f} {r['text_step_s']:23.3f}")


if __name__ == "__main__":
    main()
