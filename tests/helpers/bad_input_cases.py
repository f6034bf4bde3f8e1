"""The cases of the bad-input matrix (tests/helpers/bad_input_matrix.py has the contract and the runner), one list per
entry point. `expect` holds what the one line must name (the file, key or option) and, where there is one, the
way out; `{tmp}` and `{fx.*}` are filled in from the case's context."""
from __future__ import annotations

import json
from pathlib import Path

from bad_input_matrix import REPO, TINY_MODEL, Case, Ctx

BUILTIN = str(REPO / "configs" / "builtin.yaml")
GIB = 2**30


def _manifest(ctx: Ctx) -> dict:
    return json.loads((ctx.fx.shards / "manifest.json").read_text())


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _fifo(ctx: Ctx, name: str) -> Path:
    """A named pipe: not a regular file, as a device is, but harmless to this machine if a command wrote to it."""
    import os

    path = ctx.tmp / name
    os.mkfifo(path)
    return path


def _damage_train_shard(ctx: Ctx, damage) -> Path:
    """A copy of the fixture shard set with its first train shard damaged; the copy's folder."""
    root = ctx.copy_shards()
    damage(root / json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0])
    return root


def _under_a_file(ctx: Ctx, name: str) -> Path:
    """A path whose parent is a regular file: how an unwritable folder is simulated as root (ENOTDIR)."""
    return ctx.file("blocker", "a regular file") / name


def _build(ctx: Ctx, *extra: str) -> list[str]:
    return ["build", "--source", "builtin", "--train-images", "8", "--val-images", "2", "--test-images", "2",
            "--min-concept-count", "1", *extra]


# ---------------------------------------------------------------------------------------------- shards


def shards_cases() -> list[Case]:
    out = lambda c: [c.tmp / "out" / "manifest.json"]  # noqa: E731
    return [
        Case("shards_unknown_source", "shards", lambda c: ["build", "--source", "flickr", "--out", str(c.tmp / "o")],
             ("--source", "invalid choice", "--help")),
        Case("shards_missing_out", "shards", lambda c: ["build", "--source", "builtin"], ("--out", "--help")),
        Case("shards_unknown_command", "shards", lambda c: ["biuld"], ("biuld", "--help")),
        Case("shards_images_not_a_number", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--train-images", "many"), ("--train-images", "many")),
        Case("shards_zero_train_images", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--train-images", "0"), ("--train-images", ">= 1")),
        Case("shards_unknown_pos", "shards", lambda c: _build(c, "--out", str(c.tmp / "out"), "--pos", "NOUNS"),
             ("--pos", "NOUNS")),
        Case("shards_out_not_empty", "shards",
             lambda c: (c.file("out/notes.txt", "mine"), _build(c, "--out", str(c.tmp / "out")))[1],
             ("{tmp}/out", "--overwrite")),
        Case("shards_out_is_a_file", "shards", lambda c: _build(c, "--out", str(c.file("out", "x"))),
             ("{tmp}/out", "not a folder")),
        Case("shards_out_unwritable", "shards",
             lambda c: _build(c, "--out", str(_under_a_file(c, "set"))), ("{tmp}/blocker",)),
        Case("shards_resume_and_overwrite", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--resume", "--overwrite"), ("--resume", "--overwrite"),
             absent=out),
        Case("shards_missing_spacy_pipeline", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--spacy-pipeline", "xx_no_such_pipeline"),
             ("xx_no_such_pipeline",), absent=out),
        Case("shards_vocab_from_not_a_set", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--vocab-from", str(c.tmp)), ("--vocab-from",),
             absent=out),
        Case("shards_openmoji_without_dir", "shards",
             lambda c: ["build", "--source", "openmoji", "--out", str(c.tmp / "out")], ("--openmoji-dir",), absent=out),
        Case("shards_openmoji_dir_without_table", "shards",
             lambda c: (c.file("package/README.md", "not openmoji"),
                        ["build", "--source", "openmoji", "--openmoji-dir", str(c.tmp / "package"),
                         "--out", str(c.tmp / "out")])[1], ("{tmp}/package/data/openmoji.json",), absent=out),
        Case("shards_csv_table_missing", "shards",
             lambda c: ["build", "--source", "csv", "--table", str(c.tmp / "pairs.tsv"), "--images", str(c.tmp),
                        "--out", str(c.tmp / "out")], ("{tmp}/pairs.tsv",), absent=out),
        Case("shards_csv_table_empty", "shards",
             lambda c: ["build", "--source", "csv", "--table", str(c.file("pairs.tsv")), "--images", str(c.tmp),
                        "--out", str(c.tmp / "out")], ("{tmp}/pairs.tsv",), absent=out),
        Case("shards_karpathy_json_truncated", "shards",
             lambda c: ["build", "--source", "karpathy", "--karpathy-json",
                        str(c.file("dataset.json", '{"images": [{"filename": "a.jpg", "split"')),
                        "--images", str(c.tmp), "--out", str(c.tmp / "out")], ("{tmp}/dataset.json",), absent=out),
        Case("shards_karpathy_json_is_a_folder", "shards",
             lambda c: ["build", "--source", "karpathy", "--karpathy-json", str(c.tmp), "--images", str(c.tmp),
                        "--out", str(c.tmp / "out")], (str("{tmp}"),), absent=out),
        Case("shards_check_missing_folder", "shards", lambda c: ["check", str(c.tmp / "nowhere")],
             ("{tmp}/nowhere",)),
        Case("shards_check_a_file", "shards", lambda c: ["check", str(c.file("set.tar", "x"))], ("{tmp}/set.tar",)),
        Case("shards_check_truncated_manifest", "shards",
             lambda c: ["check", str(_truncate(c.copy_shards() / "manifest.json").parent)],
             ("{tmp}/shards/manifest.json",)),
        Case("shards_check_manifest_is_a_list", "shards",
             lambda c: ["check", str(c.file("set/manifest.json", "[1, 2]").parent)], ("{tmp}/set/manifest.json",)),
        Case("shards_check_concepts_missing", "shards",
             lambda c: (lambda s: ((s / "concepts.json").unlink(), ["check", str(s)])[1])(c.copy_shards()),
             ("{tmp}/shards/concepts.json",)),
        Case("shards_stats_missing_folder", "shards", lambda c: ["stats", str(c.tmp / "nowhere")],
             ("{tmp}/nowhere",)),
        Case("shards_stats_top_zero", "shards", lambda c: ["stats", str(c.fx.shards), "--top", "0"], ("--top",)),
        # issue 26: tars the trainer cannot read
        Case("shards_stats_zero_byte_tar", "shards",
             lambda c: ["stats", str(_damage_train_shard(c, lambda p: p.write_bytes(b"")))],
             ("{tmp}/shards/", ".tar", "empty (0 bytes)")),
        Case("shards_stats_gzip_tar", "shards",
             lambda c: ["stats", str(_damage_train_shard(
                 c, lambda p: p.write_bytes(__import__("gzip").compress(p.read_bytes()))))],
             ("{tmp}/shards/", ".tar", "gzip-compressed")),
        Case("shards_stats_binary_vocab", "shards",
             lambda c: (lambda s: ((s / "vocab.json").write_bytes(b"\xff\xfe\x00garbage"), ["stats", str(s)])[1])(
                 c.copy_shards()), ("{tmp}/shards/vocab.json",)),
    ]


# ---------------------------------------------------------------------------------------------- trainer.train


def _shards_with(ctx: Ctx, damage) -> Path:
    root = ctx.copy_shards()
    damage(root)
    return root


def train_cases() -> list[Case]:
    t = "trainer.train"
    nothing = lambda c: [c.tmp / "out"]  # noqa: E731  (a refusal writes no run folder)
    return [
        Case("train_config_missing", t, lambda c: ["--config", str(c.tmp / "nope.yaml")], ("{tmp}/nope.yaml",)),
        Case("train_config_is_a_folder", t, lambda c: ["--config", str(c.tmp)], ("{tmp}", "is a folder")),
        Case("train_config_truncated_yaml", t,
             lambda c: ["--config", str(c.file("c.yaml", "data:\n  shards: [data/x\n  batch_size: 4\n"))],
             ("{tmp}/c.yaml", "line")),
        Case("train_config_binary", t, lambda c: ["--config", str(c.file("c.yaml", b"\x89PNG\r\n\x1a\n\x00\xff"))],
             ("{tmp}/c.yaml",)),
        Case("train_config_is_a_list", t, lambda c: ["--config", str(c.file("c.yaml", "- a\n- b\n"))],
             ("{tmp}/c.yaml", "mapping")),
        Case("train_config_unknown_key", t, lambda c: ["--config", str(c.config("train:\n  stpes: 3"))],
             ("train.stpes", "unknown key")),
        Case("train_override_without_value", t, lambda c: c.good_train("train.steps"), ("train.steps", "key=value")),
        Case("train_override_unknown_key", t, lambda c: c.good_train("train.stepz=5"), ("train.stepz",)),
        Case("train_override_wrong_type", t, lambda c: c.good_train("train.steps=many"), ("train.steps", "integer")),
        Case("train_override_impossible", t, lambda c: c.good_train("data.batch_size=1"), ("data.batch_size",)),
        # issue 26: values the run cannot use, and YAML that would be read silently
        Case("train_override_lr_infinite", t, lambda c: c.good_train("optim.lr=inf"), ("optim.lr", "finite")),
        Case("train_override_temperature_nan", t, lambda c: c.good_train("loss.temperature=nan"),
             ("loss.temperature", "finite")),
        Case("train_override_seed_out_of_range", t, lambda c: c.good_train("run.seed=99999999999999999999"),
             ("run.seed", "2**32")),
        Case("train_config_empty", t, lambda c: ["--config", str(c.file("c.yaml", ""))], ("{tmp}/c.yaml", "empty")),
        Case("train_config_duplicate_key", t, lambda c: ["--config", str(c.config("train:\n  steps: 3\n  steps: 4"))],
             ("{tmp}/config.yaml", "'steps' is given twice")),
        Case("train_unknown_option", t, lambda c: c.good_train("--stpes", "5"), ("--stpes", "--help")),
        Case("train_resume_without_value", t, lambda c: c.good_train("--resume"), ("--resume",)),
        Case("train_no_config", t, lambda c: ["train.steps=5"], ("--config", "--help")),
        Case("train_shards_missing", t, lambda c: c.good_train(f"data.shards={c.tmp / 'nowhere'}"),
             ("data.shards", "shards build"), absent=nothing),
        Case("train_shards_is_a_file", t, lambda c: c.good_train(f"data.shards={c.file('set.tar', 'x')}"),
             ("data.shards", "{tmp}/set.tar"), absent=nothing),
        Case("train_manifest_truncated", t,
             lambda c: c.good_train(f"data.shards={_shards_with(c, lambda s: _truncate(s / 'manifest.json'))}"),
             ("data.shards", "{tmp}/shards/manifest.json"), absent=nothing),
        Case("train_manifest_wrong_kind", t,
             lambda c: c.good_train("data.shards=" + str(_shards_with(
                 c, lambda s: (s / "manifest.json").write_text('{"format": "coco"}')))),
             ("{tmp}/shards/manifest.json", "hier-shards"), absent=nothing),
        Case("train_concepts_missing", t,
             lambda c: c.good_train(f"data.shards={_shards_with(c, lambda s: (s / 'concepts.json').unlink())}",
                                    "train.steps=1"), ("data.shards", "{tmp}/shards/concepts.json"), absent=nothing),
        Case("train_shard_file_missing", t,
             lambda c: c.good_train("data.shards=" + str(_shards_with(c, lambda s: (
                 s / _manifest(c)["splits"]["val"]["shards"][0]).unlink()))),
             ("data.shards", _manifest_shard_hint()), absent=nothing),
        Case("train_split_misspelt", t, lambda c: c.good_train("data.eval_split=vall"), ("data.eval_split", "vall")),
        Case("train_deepspeed_json_truncated", t,
             lambda c: c.good_train("engine.deepspeed_config=" + str(c.file("ds.json", '{"zero_optimization": {'))),
             ("engine.deepspeed_config", "{tmp}/ds.json"), absent=nothing),
        Case("train_deepspeed_json_is_a_folder", t, lambda c: c.good_train(f"engine.deepspeed_config={c.tmp}"),
             ("engine.deepspeed_config", "folder")),
        Case("train_out_dir_is_a_file", t, lambda c: c.good_train(f"run.out_dir={c.file('out', 'x')}"),
             ("run.out_dir", "{tmp}/out")),
        Case("train_out_dir_unwritable", t, lambda c: c.good_train(f"run.out_dir={_under_a_file(c, 'run')}"),
             ("run.out_dir", "{tmp}/blocker")),
        Case("train_init_from_missing", t, lambda c: c.good_train(f"model.init_from={c.tmp / 'model.pt'}"),
             ("model.init_from", "trainer.export"), absent=nothing),
        Case("train_resume_without_checkpoints", t, lambda c: c.good_train("--resume", "latest"),
             ("run.resume=latest", "{tmp}/out/checkpoints"), own_process=True),  # starts a process group
        # issue 26: a run folder is owned by its run
        Case("train_out_dir_holds_another_run", t, lambda c: c.good_train(f"run.out_dir={c.copy_run()}"),
             ("run.out_dir", "{tmp}/run", "--resume latest", "--overwrite"), own_process=True),
        Case("train_overwrite_and_resume", t, lambda c: c.good_train("--overwrite", "--resume", "latest"),
             ("--overwrite", "--resume", "--help")),
    ]


def _manifest_shard_hint() -> str:
    return "missing"


# ---------------------------------------------------------------------------------------------- evaluate, export


def _damaged_run(ctx: Ctx, damage) -> Path:
    run = ctx.copy_run()
    tag = (run / "checkpoints" / "latest").read_text().strip()
    damage(run / "checkpoints" / tag)
    return run


def _garble_same_size(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


MODEL_STATES = "mp_rank_00_model_states.pt"


def evaluate_cases() -> list[Case]:
    e = "trainer.evaluate"
    return [
        Case("evaluate_run_missing", e, lambda c: ["--run", str(c.tmp / "nowhere")], ("--run", "{tmp}/nowhere")),
        Case("evaluate_run_is_a_file", e, lambda c: ["--run", str(c.file("run.txt", "x"))], ("--run", "{tmp}/run.txt")),
        Case("evaluate_run_without_config", e, lambda c: ["--run", str(c.tmp)], ("config.yaml", "run.out_dir")),
        Case("evaluate_run_config_truncated", e,
             lambda c: (lambda r: (_truncate(r / "config.yaml", 0.3), ["--run", str(r)])[1])(c.copy_run()),
             ("{tmp}/run/config.yaml",)),
        Case("evaluate_split_misspelt", e, lambda c: ["--run", str(c.fx.run), "--split", "tset"], ("--split", "tset")),
        Case("evaluate_checkpoint_unknown", e, lambda c: ["--run", str(c.fx.run), "--checkpoint", "step9"],
             ("--checkpoint=step9", "complete checkpoints")),
        Case("evaluate_model_states_truncated", e,
             lambda c: ["--run", str(_damaged_run(c, lambda f: _truncate(f / MODEL_STATES)))],
             (MODEL_STATES, "truncated")),
        Case("evaluate_model_states_garbled", e,
             lambda c: ["--run", str(_damaged_run(c, lambda f: _garble_same_size(f / MODEL_STATES)))],
             (MODEL_STATES, "not a readable checkpoint file")),
        Case("evaluate_marker_missing", e,
             lambda c: ["--run", str(_damaged_run(c, lambda f: (f / "complete.json").unlink()))],
             ("complete.json", "not completely written")),
        Case("evaluate_no_checkpoints", e,
             lambda c: (lambda r: (__import__("shutil").rmtree(r / "checkpoints"), ["--run", str(r)])[1])(c.copy_run()),
             ("{tmp}/run/checkpoints", "does not exist")),
        Case("evaluate_override_unknown_key", e, lambda c: ["--run", str(c.fx.run), "data.batchsize=3"],
             ("data.batchsize",)),
        Case("evaluate_missing_run_option", e, lambda c: ["--split", "test"], ("--run", "--help")),
    ]


def export_cases() -> list[Case]:
    x = "trainer.export"
    model = lambda c: [c.tmp / "model.pt"]  # noqa: E731
    return [
        Case("export_run_missing", x, lambda c: ["--run", str(c.tmp / "nowhere"), "--out", str(c.tmp / "model.pt")],
             ("--run", "{tmp}/nowhere"), absent=model),
        Case("export_checkpoint_unknown", x,
             lambda c: ["--run", str(c.fx.run), "--checkpoint", "best", "--out", str(c.tmp / "model.pt")],
             ("--checkpoint=best",), absent=model),
        Case("export_out_is_a_folder", x, lambda c: ["--run", str(c.fx.run), "--out", str(c.tmp)],
             ("--out", "is a folder", "model.pt")),
        Case("export_out_unwritable", x,
             lambda c: ["--run", str(c.fx.run), "--out", str(_under_a_file(c, "model.pt"))], ("{tmp}/blocker",)),
        Case("export_model_states_truncated", x,
             lambda c: ["--run", str(_damaged_run(c, lambda f: _truncate(f / MODEL_STATES))), "--out",
                        str(c.tmp / "model.pt")], (MODEL_STATES,), absent=model),
        Case("export_missing_out_option", x, lambda c: ["--run", str(c.fx.run)], ("--out", "--help")),
        # issue 26: outputs are files (a pipe stands for a device: a regression must not replace /dev/full here)
        Case("export_out_is_a_device", x, lambda c: ["--run", str(c.fx.run), "--out", str(_fifo(c, "model.pt"))],
             ("--out", "{tmp}/model.pt", "not a regular file")),
        Case("export_out_ends_in_a_slash", x, lambda c: ["--run", str(c.fx.run), "--out", f"{c.tmp}/newdir/"],
             ("--out", "{tmp}/newdir/", "is a folder"), absent=lambda c: [c.tmp / "newdir"]),
        Case("export_out_folder_missing", x,
             lambda c: ["--run", str(c.fx.run), "--out", str(c.tmp / "nowhere" / "model.pt")],
             ("--out", "{tmp}/nowhere", "does not exist"), absent=lambda c: [c.tmp / "nowhere"]),
        Case("export_full_disk", x, lambda c: ["--run", str(c.fx.run), "--out", str(c.tmp / "model.pt")],
             ("model.pt", "space"), own_process=True, file_size_limit=4096, absent=model),
    ]


# ---------------------------------------------------------------------------------------------- retrieve


def retrieve_cases() -> list[Case]:
    r = "trainer.retrieve"
    query = lambda c, *a: ["query", "--index", str(c.fx.index), *a]  # noqa: E731
    return [
        Case("retrieve_export_run_missing", r,
             lambda c: ["export", "--run", str(c.tmp / "nowhere"), "--out", str(c.tmp / "index")],
             ("{tmp}/nowhere",), absent=lambda c: [c.tmp / "index"]),
        Case("retrieve_export_model_states_truncated", r,
             lambda c: ["export", "--run", str(_damaged_run(c, lambda f: _truncate(f / MODEL_STATES))),
                        "--out", str(c.tmp / "index")], (MODEL_STATES,), absent=lambda c: [c.tmp / "index"]),
        Case("retrieve_query_index_missing", r, lambda c: ["query", "--index", str(c.tmp / "nowhere"), "--text", "a"],
             ("{tmp}/nowhere", "retrieve export")),
        Case("retrieve_query_index_incomplete", r,
             lambda c: ["query", "--index", str(c.file("idx/index.json", "{}").parent), "--text", "a"],
             ("{tmp}/idx",)),
        Case("retrieve_query_index_json_truncated", r,
             lambda c: (lambda d: (_truncate(d / "index.json"), ["query", "--index", str(d), "--text", "a"])[1])(
                 Path(__import__("shutil").copytree(c.fx.index, c.tmp / "idx"))), ("{tmp}/idx/index.json",)),
        Case("retrieve_query_image_missing", r, lambda c: query(c, "--image", str(c.tmp / "star.png")),
             ("{tmp}/star.png",)),
        Case("retrieve_query_image_not_a_picture", r,  # loads the model: a process group of its own
             lambda c: query(c, "--image", str(c.file("notapicture.png", "plain text"))), ("{tmp}/notapicture.png",),
             own_process=True),
        Case("retrieve_query_image_is_a_folder", r, lambda c: query(c, "--image", str(c.tmp)), ("{tmp}",)),
        Case("retrieve_query_k_zero", r, lambda c: query(c, "--text", "a red star", "--k", "0"), ("k",)),
        Case("retrieve_query_no_query", r, lambda c: query(c), ("--text", "--image")),
        # issue 26: numeric options out of range or not finite
        Case("retrieve_serve_port_out_of_range", r, lambda c: ["serve", "--index", str(c.fx.index), "--port", "70000"],
             ("--port", "70000", "65535")),
        Case("retrieve_query_k_infinite", r, lambda c: query(c, "--text", "a red star", "--k", "inf"), ("--k", "inf")),
    ]


# ---------------------------------------------------------------------------------------------- others


def extract_cases() -> list[Case]:
    x = "trainer.extract_features"
    return [
        Case("extract_shards_missing", x, lambda c: ["--shards", str(c.tmp / "nowhere"), "--out", str(c.tmp / "f")],
             ("--shards", "{tmp}/nowhere"), absent=lambda c: [c.tmp / "f"]),
        Case("extract_out_is_input", x, lambda c: ["--shards", str(c.fx.shards), "--out", str(c.fx.shards)],
             ("--out", "input shard set")),
        Case("extract_out_holds_a_set", x,
             lambda c: ["--shards", str(c.fx.shards), "--out", str(c.file("f/manifest.json", "{}").parent)],
             ("{tmp}/f/manifest.json", "--out")),
        Case("extract_unknown_encoder", x,
             lambda c: ["--shards", str(c.fx.shards), "--out", str(c.tmp / "f"), "--encoder", "resnet"],
             ("--encoder", "resnet")),
        Case("extract_image_size_not_a_number", x,
             lambda c: ["--shards", str(c.fx.shards), "--out", str(c.tmp / "f"), "--image-size", "big"],
             ("--image-size",)),
        Case("extract_weights_missing", x,
             lambda c: ["--shards", str(c.fx.shards), "--out", str(c.tmp / "f"), "--weights", str(c.tmp / "w.pth")],
             ("--weights", "{tmp}/w.pth"), absent=lambda c: [c.tmp / "f"]),
        Case("extract_out_unwritable", x,
             lambda c: ["--shards", str(c.fx.shards), "--out", str(_under_a_file(c, "f"))], ("{tmp}/blocker",)),
    ]


def plan_cases() -> list[Case]:
    p = "trainer.plan"
    sizes = ["--vocab-size", "100", "--num-concepts", "10"]
    return [
        Case("plan_config_missing", p, lambda c: ["--config", str(c.tmp / "x.yaml"), "--gpus", "8"], ("{tmp}/x.yaml",)),
        Case("plan_gpus_zero", p, lambda c: ["--config", BUILTIN, "--gpus", "0", *sizes], ("--gpus",)),
        Case("plan_gpus_not_a_number", p, lambda c: ["--config", BUILTIN, "--gpus", "eight", *sizes], ("--gpus",)),
        Case("plan_headroom_too_large", p, lambda c: ["--config", BUILTIN, "--gpus", "1", "--headroom", "2", *sizes],
             ("--headroom",)),
        Case("plan_gpu_mem_nan", p, lambda c: ["--config", BUILTIN, "--gpus", "1", "--gpu-mem-gib", "nan", *sizes],
             ("--gpu-mem-gib", "finite")),
        Case("plan_vocab_size_negative", p, lambda c: ["--config", BUILTIN, "--gpus", "1", "--vocab-size", "-5",
                                                        "--num-concepts", "10"], ("--vocab-size", "-5")),
        Case("plan_no_shards_no_sizes", p,
             lambda c: ["--config", BUILTIN, "--gpus", "1", f"data.shards={c.tmp / 'nowhere'}"],
             ("data.shards", "--vocab-size")),
        Case("plan_override_unknown_key", p, lambda c: ["--config", BUILTIN, "--gpus", "1", *sizes, "model.dim=3"],
             ("model.dim",)),
    ]


# ---------------------------------------------------------------------------------------------- own processes


def launch_cases() -> list[Case]:
    def script(name: str, *args: str):
        return lambda c: [str(REPO / "launch" / name), *[a.format(c=c) for a in args]]

    good = ["data.shards={c.fx.shards}", "run.out_dir={c.tmp}/out", *TINY_MODEL]
    return [
        Case("launch_cpu_2proc_no_args", "bash", script("cpu_2proc.sh"), ("usage", "CONFIG"), own_process=True),
        Case("launch_cpu_2proc_config_missing", "bash", script("cpu_2proc.sh", "{c.tmp}/nope.yaml"),
             ("{tmp}/nope.yaml",), own_process=True),
        Case("launch_cpu_2proc_bad_override", "bash", script("cpu_2proc.sh", BUILTIN, *good, "train.steps=0"),
             ("train.steps",), own_process=True, absent=lambda c: [c.tmp / "out"]),
        Case("launch_torchrun_multinode_no_nnodes", "bash", script("torchrun_multinode.sh", BUILTIN),
             ("NNODES",), own_process=True),
        # issue 26: counts that are zero, negative, not numbers or out of range (one line, before any rank starts)
        Case("launch_torchrun_node_rank_out_of_range", "bash", script("torchrun_multinode.sh", BUILTIN),
             ("NODE_RANK=5", "0 .. 1"), own_process=True,
             env=lambda c: {"NNODES": "2", "NODE_RANK": "5", "MASTER_ADDR": "127.0.0.1"}),
        Case("launch_torchrun_nnodes_not_a_number", "bash", script("torchrun_multinode.sh", BUILTIN),
             ("NNODES=two", "whole number"), own_process=True,
             env=lambda c: {"NNODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
        Case("launch_cpu_2proc_nproc_zero", "bash", script("cpu_2proc.sh", BUILTIN), ("NPROC=0", ">= 1"),
             own_process=True, env=lambda c: {"NPROC": "0"}),
        Case("launch_accelerate_processes_negative", "bash", script("accelerate.sh", BUILTIN),
             ("NUM_PROCESSES=-1", ">= 1"), own_process=True, env=lambda c: {"NUM_PROCESSES": "-1"}),
        Case("launch_deepspeed_hostfile_missing", "bash", script("deepspeed_hostfile.sh", BUILTIN),
             ("{tmp}/hostfile",), own_process=True, env=lambda c: {"HOSTFILE": str(c.tmp / "hostfile")}),
        Case("launch_accelerate_no_processes", "bash", script("accelerate.sh", BUILTIN), ("NUM_PROCESSES",),
             own_process=True, env=lambda c: {"NUM_PROCESSES": ""}),
        Case("launch_slurm_config_missing", "bash", script("slurm.sbatch", "{c.tmp}/nope.yaml"), ("{tmp}/nope.yaml",),
             own_process=True, env=lambda c: {"SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1"}),
    ]


def process_cases() -> list[Case]:
    """Cases that need a real process: what a user sees at a start (no third-party noise), Ctrl-C."""
    return [
        Case("process_evaluate_run_missing", "trainer.evaluate", lambda c: ["--run", str(c.tmp / "nowhere")],
             ("{tmp}/nowhere",), own_process=True),
        Case("process_train_manifest_truncated", "trainer.train",
             lambda c: c.good_train(f"data.shards={_shards_with(c, lambda s: _truncate(s / 'manifest.json'))}"),
             ("{tmp}/shards/manifest.json",), own_process=True),
        Case("process_shards_build_interrupted", "shards",
             lambda c: _build(c, "--out", str(c.tmp / "out"), "--train-images", "4000", "--spacy-pipeline", "blank"),
             ("interrupted", "--resume"), code=130, own_process=True,
             interrupt_when=lambda c: (c.tmp / "out" / "build.partial.json").is_file(),
             absent=lambda c: [c.tmp / "out" / "manifest.json"]),
    ]


def all_cases() -> list[Case]:
    cases = (shards_cases() + train_cases() + evaluate_cases() + export_cases() + retrieve_cases()
             + extract_cases() + plan_cases() + launch_cases() + process_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
