"""Capacity planner: per-GPU memory of a configured run under each ZeRO stage, and the largest batch that fits.

    python -m trainer.plan --config configs/builtin.yaml --gpus 8 --nodes 4
    python -m trainer.plan --config configs/builtin.yaml --gpus 8 --nodes 1 --gpu-mem-gib 40 engine.precision=bf16
    python -m trainer.plan --config configs/coco_butd_bigru.yaml --gpus 8 --nodes 16 --gpu-mem-gib 80 \
        --vocab-size 10000 --num-concepts 1000      # without the shard set at hand

What it counts, per GPU, for W = gpus x nodes ranks, P parameters, n pairs per rank and N = n x W columns:
- model states, as DeepSpeed 0.19 lays them out (checked against real engines by tests/unit/tools/test_plan.py):
  stage 0: parameters, gradients and AdamW's two moments whole on every rank; stage 1: fp32 master weights and
  moments split W ways; stage 2: also the gradients;
  stage 3: also the parameters. "+offload": master weights, moments and fp32 gradients in CPU memory.
  engine.precision=bf16 is autocast over fp32 parameters (the master weights): model states are fp32 in
  both precisions, only the activations shrink.
- activations: measured, not guessed: one forward of the configured model on the CPU at two small batch sizes,
  under the configured autocast, summing the bytes of the distinct storages autograd saves for backward
  (`torch.autograd.graph.saved_tensors_hooks`); the difference gives bytes per sample, the rest a fixed part
  (e.g. GPO's weight tables). Inputs are the configured encoders' own: pictures, or model.max_regions region
  features; captions from the configured tokenizer at full length (data.max_words), the worst case.
- the loss: each rank scores n rows against N columns, both directions, two spaces: score matrices, labels,
  masks, hinge and soft-target intermediates and their gradients, LOSS_BYTES_PER_PAIR bytes per (row, column)
  at the peak of forward + backward (measured by bench/loss_scaling.py), plus the float concept indicators of
  all N rows (LOSS_BYTES_PER_CONCEPT_CELL per column and concept).
- the all-gather of the global batch: embeddings (4 x N x D in fp32, with autograd) and labels
  (N image ids, 2 x N x K float32 concept multi-hots), exactly what `trainer.training.step.gather_global_batch` gathers.
- with engine.grad_cache (k = engine.grad_accum): activations of one micro-batch of n only, but the loss of k n
  rows against N = k n W columns, the gather of all N, and this rank's k n cached outputs with their cached
  gradients (trainer/training/grad_cache.py). The largest global batch is then bounded by the loss matrices and
  the cached embeddings, not by activations: the table gives the largest k at the configured n.
Memory an allocator keeps in reserve, CUDA context and DeepSpeed's communication buckets are not counted:
the fit uses --headroom of the GPU's memory.
"""
from __future__ import annotations

from usercli import DefaultsHelpFormatter, OneLineParser
from usercli.options import int_in, number_in

PROG = "python -m trainer.plan"


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.plan` (no torch: `--help` answers at once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file of the run to plan, e.g. configs/builtin.yaml")
    parser.add_argument("--gpus", type=int_in(1), required=True, help="GPUs per node")
    parser.add_argument("--nodes", type=int_in(1), default=1, help="nodes (W = gpus x nodes ranks)")
    parser.add_argument("--gpu-mem-gib", type=number_in(0, low_open=True), default=80.0,
                        help="memory of one GPU in GiB")
    parser.add_argument("--headroom", type=number_in(0, 1, low_open=True), default=0.85,
                        help="fraction of GPU memory the plan may fill")
    parser.add_argument("--vocab-size", type=int_in(1), default=None,
                        help="word vocabulary size, instead of reading the shard set")
    parser.add_argument("--num-concepts", type=int_in(0), default=None,
                        help="concept vocabulary size K, instead of reading the shard set")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (as trainer.train takes them)")
    return parser
