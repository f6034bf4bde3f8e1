"""Retrieval evaluation (docs/design.md section 4): embed a split once, score by chunked matrix products.

Every rank embeds its share of the split's shards (any share, none included); the embeddings are gathered on
rank 0 and scored there once, on its device, in tiles (trainer.eval.metrics); the results go to every rank.
Ranks run the same number of forward calls (a rank that ran out of data embeds a dummy batch), because under
ZeRO-3 each forward call gathers partitioned parameters collectively.

The command `python -m trainer.evaluate` and its help: trainer/eval/evaluate_args.py.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from shards.remote import is_pipe, is_url
from trainer.config import Config, ConfigError, load_run_config
from trainer.data.collate import pad_tokens, stack_image_inputs
from trainer.data.decode import RegionSpec
from trainer.data.eval_samples import iter_eval_samples
from trainer.data.shardset import ShardSet, require_same_vocabularies
from trainer.data.text import CaptionTokenizer, WordTokenizer
from trainer.distributed import (
    DistInfo,
    all_reduce_max,
    broadcast_object,
    gather_no_grad,
    gather_objects_to_main,
    gather_rows_to_main,
    init_distributed,
    is_active,
    shutdown,
)
from trainer.distributed import rank as dist_rank
from trainer.engine import checkpoint as checkpoints
from trainer.engine.build import build_engine, deepspeed_config
from trainer.eval import concat_weight, metrics
from trainer.eval.evaluate_args import PROG, build_parser
from trainer.eval.ground_truth import split_objects
from trainer.models.configs import AUTO_WEIGHT, share_of_weight
from trainer.observe.progress import ProgressBar, progress_enabled
from trainer.training.factory import build_model, build_tokenizer
from usercli import cli_main

log = logging.getLogger(__name__)


def embed_batch(model, image_inputs: dict, token_lists: list[list[int]], pad_id: int):
    """The encoder calls of one batch: (img_g, img_l, cap_g, cap_l), the local ones None without a local space.
    Evaluation and the retrieval export (trainer.retrieval.pieces) embed through it, so their vectors agree.
    image_inputs: {"images"} (pictures) or {"images", "image_lengths"} (region features). Lengths stay on
    the host, where the model checks them."""
    tokens, lengths = pad_tokens(token_lists, pad_id)
    device = next(iter(model.parameters())).device
    img_g, img_l = model.encode_image(image_inputs["images"].to(device, non_blocking=True),
                                      image_inputs.get("image_lengths"))
    cap_g, cap_l = model.encode_text(tokens.to(device, non_blocking=True), lengths)
    return img_g, img_l, cap_g, cap_l


def _next_chunk(samples, batch_size: int) -> list[dict]:
    return [s for _, s in zip(range(batch_size), samples)]


@dataclass(frozen=True)
class EmbedOptions:
    """How samples are read and batched for embedding (evaluation's embed_split, the retrieval export's
    embed_pieces): the run's data settings, usually from `EmbedOptions.from_config`."""

    image_size: int
    max_words: int
    batch_size: int
    tokenizer: CaptionTokenizer | None = None  # None: the shard set's words (WordTokenizer, max_words)
    regions: RegionSpec | None = None  # set: the samples' npy region features are embedded instead of pictures

    @classmethod
    def from_config(cls, cfg: Config, vocab, batch_size: int | None = None) -> EmbedOptions:
        """The run's options: its image size, caption length, tokenizer (trainer.training.factory.build_tokenizer)
        and region features; `batch_size` defaults to data.eval_batch_size."""
        return cls(image_size=cfg.data.image_size, max_words=cfg.data.max_words,
                   batch_size=batch_size or cfg.data.eval_batch_size, tokenizer=build_tokenizer(cfg, vocab),
                   regions=RegionSpec.from_config(cfg))

    def caption_tokenizer(self, vocab) -> CaptionTokenizer:
        return self.tokenizer or WordTokenizer(vocab, self.max_words)

    def dummy_inputs(self) -> dict:
        """What a rank that ran out of data embeds, to keep its forward calls in step with the others."""
        if self.regions is None:
            return {"images": torch.zeros(1, 3, self.image_size, self.image_size)}
        return {"images": torch.zeros(1, 1, self.regions.dim), "image_lengths": torch.ones(1, dtype=torch.long)}


@torch.no_grad()
def embed_split(model, shardset: ShardSet, split: str, options: EmbedOptions, *, rank: int = 0, world: int = 1,
                device: torch.device | None = None) -> dict | None:
    """Embeddings of every picture and caption of a split (float32, on the model's device), gathered on rank 0;
    None on the other ranks. Every rank embeds its share of the split's shards (any share: a rank with no
    shard embeds dummy batches while others work, so forward calls stay in step under ZeRO-3, and joins every
    gather with zero rows). Captions are tokenised by options.tokenizer (None: the shard set's words)."""
    was_training = model.training
    model.eval()
    device = device or next(iter(model.parameters())).device
    tokenizer, regions, batch_size = options.caption_tokenizer(shardset.vocab), options.regions, options.batch_size
    samples = iter_eval_samples(shardset, split, options.image_size, options.max_words, rank, world, tokenizer,
                                regions)
    bar = ProgressBar(shardset.split_info(split)["images"], f"embed {split}", unit="img", leave=False,
                      enabled=progress_enabled(rank))
    dummy = options.dummy_inputs()
    out = {"img_g": [], "img_l": [], "cap_g": [], "cap_l": [], "cap_to_img": [], "image_ids": [], "captions": []}
    n_images = 0
    while True:
        chunk = _next_chunk(samples, batch_size)
        if int(all_reduce_max(torch.tensor([len(chunk)], device=device))[0]) == 0:
            break
        if not chunk:  # keep collective forward calls in step with the ranks that still have data
            embed_batch(model, dummy, [tokenizer.encode("")], tokenizer.pad_id)
            continue
        image_inputs = stack_image_inputs([s["image"] for s in chunk], regions)
        token_lists = [t for s in chunk for t in s["tokens"]]
        for key, value in zip(("img_g", "img_l", "cap_g", "cap_l"),
                              embed_batch(model, image_inputs, token_lists, tokenizer.pad_id)):
            if value is not None:
                out[key].append(value.float())
        for i, s in enumerate(chunk):
            out["cap_to_img"].extend([n_images + i] * len(s["tokens"]))
            out["captions"].extend(s["captions"])
            out["image_ids"].append(s["image_id"])
        n_images += len(chunk)
        bar.update(len(chunk) * world)  # the ranks embed at about the same pace: count the split as a whole
    bar.close()
    model.train(was_training)
    return _gather_embeddings(out, n_images, model, device)


def _gather_embeddings(out: dict, n_images: int, model, device: torch.device) -> dict | None:
    """This rank's embeddings and labels, gathered on rank 0 (None elsewhere). Every rank joins every gather,
    also with nothing embedded."""
    width = model.embed_dim
    spaces = ("img_g", "img_l", "cap_g", "cap_l") if model.local_space else ("img_g", "cap_g")
    gathered = {k: gather_rows_to_main(torch.cat(out[k]) if out[k] else torch.zeros(0, width, device=device))
                for k in spaces}
    # Caption -> image indices are local to a rank: shift each rank's by the images of the ranks before it.
    images_per_rank = gather_no_grad(torch.tensor([n_images], device=device)).tolist()
    cap_to_img = torch.tensor(out["cap_to_img"], dtype=torch.long) + sum(images_per_rank[:dist_rank()])
    gathered["cap_to_img"] = gather_rows_to_main(cap_to_img.to(device))
    ids = gather_objects_to_main(out["image_ids"])
    captions = gather_objects_to_main(out["captions"])
    if ids is None:
        return None
    gathered.setdefault("img_l", None)
    gathered.setdefault("cap_l", None)
    gathered["image_ids"] = [i for part in ids for i in part]
    gathered["captions"] = [c for part in captions for c in part]
    return gathered


def score_embeddings(emb: dict, local_weight: float = 1.0) -> dict:
    """R@K and rSum for the global, local and concatenated (<g,g> + w <l,l>, w = local_weight) scores, plus
    chance level (on the embeddings' device, in tiles: trainer.eval.metrics)."""
    return score_mixed(emb, share_of_weight(local_weight))


def score_mixed(emb: dict, local_share: float, choose: bool = False) -> dict:
    """score_embeddings with the concatenation's local share a (trainer.eval.concat_weight). choose: a is chosen
    here, on these embeddings, from concat_weight.SHARE_GRID (ties keep `local_share`), and results["concat_weight"]
    records the choice and the grid's rSums; without, it records the share used. PMRP and the COCO 1K folds
    score the concatenation with the share used."""
    results: dict = {}
    if emb["img_l"] is None:
        results.update(metrics.evaluate_embeddings(emb["img_g"], None, emb["cap_g"], None, emb["cap_to_img"]))
    elif choose:
        grid = metrics.mix_recalls(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"], emb["cap_to_img"],
                                   concat_weight.SHARE_GRID)
        local_share = concat_weight.choose_share({share: r["rsum"] for share, r in grid.items()}, local_share)
        results.update({"global": grid[0.0], "local": grid[1.0], "concat": grid[local_share]})
        results["concat_weight"] = {**concat_weight.describe(local_share), "chosen": True,
                                    "grid_rsum": {f"{share:.4f}": r["rsum"] for share, r in grid.items()}}
    else:
        results.update(metrics.evaluate_embeddings(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                                   emb["cap_to_img"], local_share=local_share))
        results["concat_weight"] = {**concat_weight.describe(local_share), "chosen": False}
    per_image = torch.bincount(emb["cap_to_img"].cpu(), minlength=emb["img_g"].shape[0])
    results["chance"] = metrics.chance_recalls(per_image)
    results["counts"] = {"images": int(emb["img_g"].shape[0]), "captions": int(emb["cap_g"].shape[0])}
    if emb.get("objects") is not None:  # PCME's plausible-match R-precision, where the shards know the objects
        results["pmrp"] = metrics.plausible_match_scores(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                                         emb["cap_to_img"], metrics.object_classes(emb["objects"]),
                                                         local_share)
    if emb["img_g"].shape[0] == 5000:  # the COCO 1K protocol beside 5K: the mean over five folds of 1,000
        results["folds_1k"] = metrics.fold_average(emb["img_g"], emb["img_l"], emb["cap_g"], emb["cap_l"],
                                                   emb["cap_to_img"], local_share)
    return results


def chooses_share(cfg: Config, split: str) -> bool:
    """Whether evaluating `split` chooses the concatenation's share: model.local_score_weight=auto, a local
    space, and the validation split (data.eval_split), never the test split."""
    return (cfg.model.local_score_weight == AUTO_WEIGHT and cfg.loss.local != "none"
            and split == cfg.data.eval_split and split != cfg.data.test_split)


def evaluate_split(model, shardset: ShardSet, split: str, cfg, info: DistInfo, *,
                   on_embeddings: Callable[[dict], None] | None = None, may_choose: bool = True) -> dict:
    """Recalls of a split, on every rank of `info`: embedded on all ranks, scored once on rank 0 (on its device), the
    results sent to the others. The concatenation scores with the model's `local_share`; on the validation
    split under model.local_score_weight=auto the share is chosen there (chooses_share) and every rank's model
    keeps it; with may_choose=False (a corpus other than the run's) the run's share is used. `on_embeddings`
    (e.g. TensorBoard's retrieval examples) sees embed_split's output, on rank 0 only, moved to the host, after
    the share is chosen."""
    emb = embed_split(model, shardset, split, EmbedOptions.from_config(cfg, shardset.vocab), rank=info.rank,
                      world=info.world_size)
    results = None
    if emb is not None:
        emb["objects"] = split_objects(shardset, split, emb["image_ids"])  # plausible-match ground truth
        results = score_mixed(emb, model.local_share, choose=may_choose and chooses_share(cfg, split))
        if results.get("concat_weight", {}).get("chosen"):  # before on_embeddings: its examples use the choice
            model.local_share = results["concat_weight"]["local_share"]
        if on_embeddings is not None:
            on_embeddings({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in emb.items()})
    results = broadcast_object(results)
    if results.get("concat_weight", {}).get("chosen"):  # every rank's model scores with the share rank 0 chose
        model.local_share = results["concat_weight"]["local_share"]
    return results


def results_table(results: dict) -> str:
    """The recalls' table, then the line that says how the concatenation mixed the spaces."""
    scores = {k: v for k, v in results.items() if k in ("global", "local", "concat")}
    table = metrics.format_table(scores, chance=results.get("chance"))
    return table + (f"\n{concat_line(results['concat_weight'])}" if "concat_weight" in results else "")


def concat_line(chosen: dict) -> str:
    """'concat = 0.333 global + 0.667 local (model.local_score_weight 2), chosen on this split by rSum'."""
    share, weight = chosen["local_share"], chosen["local_score_weight"]
    how = "chosen on this split by rSum over the local shares " + \
        ", ".join(f"{float(a):.2g}" for a in chosen["grid_rsum"]) if chosen.get("chosen") else "as the run says"
    return (f"concat = {1 - share:.3g} global + {share:.3g} local (model.local_score_weight "
            f"{'infinite' if weight is None else f'{weight:.3g}'}), {how}")


def write_results(results: dict, run_dir: Path, split: str, step: int, other_set: str | None = None) -> Path:
    """RUN/eval/<split>.json; the results on a shard set that is not the run's own (other_set: its name) go to
    RUN/eval/<name>.<split>.json and never touch the run's own results or its concatenation record."""
    path = Path(run_dir) / "eval" / (f"{split}.json" if other_set is None else f"{other_set}.{split}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"split": split, "step": step, **results}, indent=2))
    if results.get("concat_weight", {}).get("chosen"):  # the run's choice, read by evaluate, export and retrieve
        concat_weight.write_record(run_dir, results["concat_weight"], split, step)
    return path


def other_set(run_dir: str | Path, cfg: Config, shardset: ShardSet) -> str | None:
    """None when cfg.data.shards is the run's own set (as in RUN/config.yaml), else the other set's name (its
    manifest's, or its folder's): a corpus held out of the run's training, evaluated zero-shot. Such a set must have
    the run's vocabularies, or its token ids and labels would mean other words (a vocabulary of the same size would
    even load): checked against the run's own set where it can be opened, else said in the log."""
    own = open_run_config(run_dir).data.shards
    if _where(own) == _where(cfg.data.shards):
        return None
    try:
        reference = ShardSet.open(own)
    except (OSError, ValueError) as e:
        log.warning("cannot open the run's own shard set %s to check that %s shares its vocabularies (%s); it "
                    "must have been built with --vocab-from it", own, cfg.data.shards, e)
    else:
        try:
            require_same_vocabularies(shardset, reference)
        except ValueError as e:
            raise ConfigError(f"data.shards: {e}") from e
    return str(shardset.manifest.get("name") or Path(cfg.data.shards).name)


def _where(shards: str) -> str:
    """A shard set's place, comparable: a URL as given, a folder resolved."""
    return shards if is_url(shards) or is_pipe(shards) else str(Path(shards).resolve())


@dataclass
class LoadedRun:
    """A run's model restored from one checkpoint, inside its DeepSpeed engine."""

    cfg: Config
    info: DistInfo
    shardset: ShardSet
    engine: object  # deepspeed.DeepSpeedEngine
    load_path: str
    step: int
    other_set: str | None = None  # the name of a shard set other than the run's own (other_set), else None

    @property
    def model(self):
        return self.engine.module


def open_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config a run folder was trained with (its config.yaml, overrides applied), checked; a missing or
    wrong folder is refused naming it (ConfigError)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise ConfigError(f"--run {run_dir} {what}; give the run folder trainer.train wrote (its run.out_dir)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir} has no config.yaml: not a run folder written by trainer.train "
                          f"(give its run.out_dir)")
    try:
        return load_run_config(run_dir / "config.yaml", list(overrides))  # read through renamed keys
    except ConfigError as e:  # a cut or edited config.yaml reads as a wrong value: say which file holds it
        where = str(run_dir / "config.yaml")
        raise ConfigError(str(e) if where in str(e) else f"{where} (the run's config, with overrides): {e}") from e


def open_shards(cfg: Config) -> ShardSet:
    """The run's shard set; an unreadable one is refused naming the file (trainer.data raises ValueError)."""
    try:
        return ShardSet.open(cfg.data.shards)
    except ValueError as e:
        raise ConfigError(f"data.shards: {e}") from e


def check_split(cfg: Config, split: str | None) -> str:
    """The split to read (the config's test split by default), refused naming the splits there are."""
    split = split or cfg.data.test_split
    splits = open_shards(cfg).manifest["splits"]
    if split not in splits:
        raise ConfigError(f"--split {split}: no such split in {Path(cfg.data.shards) / 'manifest.json'} "
                          f"(has: {', '.join(splits)})")
    return split


def load_run(run_dir: str | Path, checkpoint: str = "latest", overrides: list[str] = ()) -> LoadedRun:
    """Build the run's engine and load a checkpoint into it (any ZeRO stage); no optimizer/scheduler state.
    The run folder, its config and the checkpoint's files are checked first (ConfigError / CheckpointError name
    the file and the way out). Leaves the process group up."""
    run_dir = Path(run_dir)
    cfg = open_run_config(run_dir, overrides)
    tag, marker = checkpoints.find_readable(run_dir / "checkpoints", checkpoint, option="--checkpoint")
    info = init_distributed()
    checkpoints.refuse_sharded_weights_elsewhere(run_dir / "checkpoints", tag, marker, info.world_size, "load")
    shardset = open_shards(cfg)
    other = other_set(run_dir, cfg, shardset)
    engine = build_engine(cfg, build_model(cfg, shardset), deepspeed_config(cfg, info.world_size))
    try:
        load_path, client = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag,
                                                   load_optimizer_states=False, load_lr_scheduler_states=False)
    except RuntimeError as e:  # torch's load_state_dict: the weights are not those of the configured model
        if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
            raise
        raise checkpoints.CheckpointError(
            f"checkpoint {run_dir / 'checkpoints' / tag} does not fit the model that {run_dir / 'config.yaml'} "
            f"(with overrides) describes: {str(e).splitlines()[-1].strip()}; restore that run's config.yaml or "
            f"drop the model.* overrides") from e
    if load_path is None:
        raise checkpoints.CheckpointError(f"--checkpoint {checkpoint}: DeepSpeed could not load "
                                          f"{run_dir / 'checkpoints' / tag}")
    step = int((client or {}).get("run_state", {}).get("step", 0))
    if engine.module.local_space:  # the concatenation's mix: fixed by the config, else the run's recorded choice
        engine.module.local_share, source = concat_weight.run_share(cfg.model.local_score_weight, run_dir)
        if info.is_main:
            log.info("concatenation: local share %.3g, %s", engine.module.local_share, source)
    return LoadedRun(cfg, info, shardset, engine, str(load_path), step, other)


def evaluate_run(run_dir: str | Path, split: str | None = None, checkpoint: str = "latest",
                 overrides: list[str] = ()) -> dict:
    """Evaluate one split of a run's checkpoint; rank 0 writes RUN/eval/<split>.json (RUN/eval/<name>.<split>.json
    for another shard set given by data.shards=: zero-shot on a held-out corpus built with --vocab-from). Leaves
    the process group up (the caller may go on using it)."""
    split = check_split(open_run_config(run_dir, overrides), split)  # before any engine is built
    run = load_run(run_dir, checkpoint, overrides)
    other = run.other_set
    results = evaluate_split(run.model, run.shardset, split, run.cfg, run.info, may_choose=other is None)
    if run.info.is_main:
        path = write_results(results, Path(run_dir), split, run.step, other)
        on = "" if other is None else f" of shard set {other!r} ({run.cfg.data.shards})"
        print(f"{split} split{on}, checkpoint {run.load_path} (step {run.step}):\n{results_table(results)}\n"
              f"written to {path}")
    return results


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ours = not is_active()  # the process group this command starts is its to end (a caller's stays up)
    try:
        evaluate_run(args.run, args.split, args.checkpoint, args.overrides)
    finally:
        if ours:
            shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line on a bad run folder, split, checkpoint or override (shards.cli)."""
    return cli_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
