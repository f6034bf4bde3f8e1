"""trainer.retrieve: a ZeRO-3 run's test split exported (streaming, in pieces) to FAISS indexes,
resumed, queried by text and by picture from the command line; every bad input answered on one line, exit 2."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from retrieval_run import REPO, clean_env, exported_index, first_test_picture, trained_run

from shards.text import PAD, UNK, Vocab
from trainer.data.text import WordTokenizer
from trainer.eval.concat_weight import read_record, record_path
from trainer.eval.evaluation import EmbedOptions, embed_split, evaluate_run, load_run
from trainer.eval.metrics import concat_rows
from trainer.retrieval.commands import ExportOptions, check_export_checkpoint, export_index, main
from trainer.retrieval.faiss_index import build_index, index_params, load_index
from trainer.retrieval.index_folder import RetrievalIndex
from trainer.retrieval.pieces import piece_path
from trainer.retrieval.query import QueryError, check_text, decode_query_picture, read_picture_file, shorten
from trainer.tools.export import export

QUIET = ("[", "Loading", "Gathering", "Detected", "Reconstructed", "Processing", "Parsing", "  return", "/")


def _cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.retrieve", *args], capture_output=True, text=True,
                          cwd=REPO, env=clean_env(**env), input=stdin, timeout=300)


def _ours(stream: str) -> list[str]:
    """Our lines of a command's output (DeepSpeed and torch log to the same streams)."""
    return [line for line in stream.splitlines() if line and not line.startswith(QUIET) and "Warning" not in line]


def test_text_and_picture_queries_are_checked(tmp_path):
    tok = WordTokenizer(Vocab([PAD, UNK, "red", "star", "a"]), max_len=4)
    assert check_text(tok, "a red star") == ([4, 2, 3], [])
    for bad, reason in (("", "empty"), ("  ", "empty"), ("?!", "no words"), ("blue moon", "none of the words")):
        with pytest.raises(QueryError, match=reason):
            check_text(tok, bad)
    ids, notes = check_text(tok, "a red star over a star and moon")
    assert len(ids) == 4 and notes == ["unknown words read as <unk>: and, moon, over",
                                       "cut to its first 4 of 8 words (data.max_words)"]
    long = "red " * 2000
    assert shorten(long) == long[:80] + "... (8000 characters)"
    with pytest.raises(QueryError, match="is a folder"):
        read_picture_file(tmp_path)
    with pytest.raises(QueryError, match="missing.png does not exist"):
        read_picture_file(tmp_path / "missing.png")
    with pytest.raises(QueryError, match=r"notes.txt is not a picture \(no format"):
        decode_query_picture(b"hello", "notes.txt", 32, None)


def test_faiss_indexes_from_pieces(tmp_path):
    """Exact search equals a matrix product; approximate ones record recall@10 against it on held-out queries."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))  # embeddings cluster; uniform noise would be IVF's worst case

    def vectors(n):
        x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, 32))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    parts = [vectors(n) for n in (700, 0, 1300)]
    loaders = [lambda p=p: p for p in parts]
    queries = vectors(50)
    flat = build_index(loaders, 32, "flat", tmp_path / "flat.faiss", queries, log=lambda _: None)
    assert flat["type"] == "flat" and flat["rows"] == 2000 and "recall_at_10" not in flat
    scores, rows = load_index(tmp_path / "flat.faiss", flat).search(queries, 10)
    truth = queries @ np.concatenate(parts).T
    np.testing.assert_array_equal(rows, np.argsort(-truth, 1, kind="stable")[:, :10])
    for kind in ("hnsw", "ivf"):
        params = build_index(loaders, 32, kind, tmp_path / f"{kind}.faiss", queries, log=lambda _: None)
        assert params["type"] == kind and params["recall_queries"] == 50 and 0.8 <= params["recall_at_10"] <= 1.0
    assert index_params("auto", 10)["type"] == "hnsw" and index_params("auto", 5_000_000)["type"] == "ivf"
    with pytest.raises(ValueError, match="--index-type must be one of"):
        index_params("lsh", 10)
    (tmp_path / "cut.faiss").write_bytes((tmp_path / "flat.faiss").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.faiss is not a readable FAISS index"):
        load_index(tmp_path / "cut.faiss", flat)


def test_bad_index_folders_are_named(tmp_path, capsys):
    assert main(["query", "--index", str(tmp_path / "missing_index"), "--text", "a red star"]) == 2
    assert capsys.readouterr().err.strip().endswith("missing_index does not exist (write it with "
                                                    "`trainer.retrieve export`)")
    assert main(["query", "--index", str(tmp_path), "--text", "a red star"]) == 2
    assert "lacks index.json, images.faiss" in capsys.readouterr().err
    for name in ("index.json", "images.faiss", "captions.faiss", "images.jsonl", "captions.jsonl"):
        (tmp_path / name).write_text("{")
    assert main(["query", "--index", str(tmp_path), "--text", "a red star"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "index.json is not a retrieval index record" in err
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before anything is loaded
        main(["query", "--index", str(tmp_path)])
    assert exit_info.value.code == 2 and "give --text, --image" in capsys.readouterr().err


@pytest.mark.slow
def test_export_resume_and_approximate_index(tiny_shards, tmp_path_factory, tmp_path, capsys):
    base = tmp_path_factory.getbasetemp()
    run_dir = trained_run(base, tiny_shards)
    index_dir = exported_index(base, tiny_shards)
    index = RetrievalIndex(index_dir)
    meta = index.meta
    assert meta["split"] == "test" and meta["counts"] == {"images": 32, "captions": 160, "skipped": 0}
    assert meta["checkpoint_tag"] == "step0000004" and meta["dim"] == 64 and meta["pieces"] == 2
    assert meta["index"]["images"]["type"] == "flat" and meta["sets"] == [str(tiny_shards)]

    # The rows are embed_split's vectors of the same checkpoint (evaluation's code), [sqrt(1 - a) g; sqrt(a) l] with
    # the share the run chose on its validation split at the end of training (model.local_score_weight=auto).
    run = load_run(run_dir)
    cfg = run.cfg
    emb = embed_split(run.model, run.shardset, "test", EmbedOptions(image_size=cfg.data.image_size,
                      max_words=cfg.data.max_words, batch_size=cfg.data.eval_batch_size))
    img = index.faiss["images"].reconstruct_n(0, 32)
    cap = index.faiss["captions"].reconstruct_n(0, 160)
    share = read_record(run_dir)["local_share"]
    assert meta["local_share"] == share == run.model.local_share
    np.testing.assert_allclose(img, concat_rows(emb["img_g"], emb["img_l"], share).numpy(), atol=1e-6)
    np.testing.assert_allclose(cap, concat_rows(emb["cap_g"], emb["cap_l"], share).numpy(), atol=1e-6)
    assert [r["image_id"] for r in index.rows["images"]] == emb["image_ids"]
    assert [c["text"] for c in index.rows["captions"]] == emb["captions"]
    assert [c["image_row"] for c in index.rows["captions"]] == emb["cap_to_img"].tolist()
    # each row's picture is reachable: its shard file and key hold the very picture the shard stores
    picture, image_id = first_test_picture(tiny_shards, tmp_path)
    row = [r["image_id"] for r in index.rows["images"]].index(image_id)
    assert index.picture(row) == (picture.read_bytes(), "image/png")
    with pytest.raises(IndexError, match="out of range"):
        index.picture(32)

    # Resume: a second shard set (a copy), a killed export (piece 1 and index.json gone) finished with --resume.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    out = tmp_path / "mixed"
    export_index(run_dir, out, ExportOptions(shards=(str(tiny_shards), str(copy))))
    first = piece_path(out, 0, "json").stat().st_mtime_ns
    before = RetrievalIndex(out).faiss["images"].reconstruct_n(0, 64)
    for suffix in ("json", "images.npy"):
        piece_path(out, 3, suffix).unlink()
    (out / "index.json").unlink()
    with pytest.raises(FileExistsError, match="add --resume to finish it or --overwrite"):
        export_index(run_dir, out, ExportOptions(shards=(str(tiny_shards), str(copy))))
    with pytest.raises(FileNotFoundError, match="unfinished export: run it again with --resume"):
        RetrievalIndex(out)
    with pytest.raises(ValueError, match="sets, split differ from those of the export in --out"):
        export_index(run_dir, out, ExportOptions(split="val", resume=True))
    meta = export_index(run_dir, out, ExportOptions(shards=(str(tiny_shards), str(copy)), resume=True, kind="hnsw"))
    assert piece_path(out, 0, "json").stat().st_mtime_ns == first  # written pieces were not embedded again
    assert meta["counts"]["images"] == 64 and meta["pieces"] == 4 and len(meta["sets"]) == 2
    mixed = RetrievalIndex(out)
    assert mixed.rows["images"][32]["shard"] == str(copy / "builtin-test-000000.tar")
    hnsw = meta["index"]["images"]
    assert hnsw["type"] == "hnsw" and hnsw["recall_at_10"] == 1.0 and hnsw["recall_queries"] == 320
    np.testing.assert_allclose(mixed.faiss["images"].reconstruct_n(0, 64), before, atol=1e-6)
    np.testing.assert_allclose(before[:32], before[32:], atol=1e-6)  # the copy embeds as the original

    # Checked before the model loads: one line naming the reason or the file, exit 2 (test_query_session_and_json
    # runs the same refusals in a process of their own: no traceback there either).
    capsys.readouterr()  # what the loads above logged
    for args, reason in ((["--text", ""], "error: the query is empty: give a caption such as 'a red star on a"),
                         (["--text", "qqq zzz"], "none of the words of 'qqq zzz' is in the model's vocabulary"),
                         (["--image", str(tmp_path)], f"--image {tmp_path} is a folder, not a picture file"),
                         (["--image", str(run_dir / "config.yaml")], "config.yaml is not a picture (no format")):
        assert main(["query", "--index", str(index_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], (args, err)


@pytest.mark.slow
def test_query_session_and_json(tiny_shards, tmp_path_factory, tmp_path, capsys, monkeypatch):
    base = tmp_path_factory.getbasetemp()
    run_dir = trained_run(base, tiny_shards)
    index_dir = exported_index(base, tiny_shards)
    index = RetrievalIndex(index_dir)
    img = index.faiss["images"].reconstruct_n(0, 32)
    cap = index.faiss["captions"].reconstruct_n(0, 160)
    captions = index.rows["captions"]
    picture, image_id = first_test_picture(tiny_shards, tmp_path)
    picture_row = [r["image_id"] for r in index.rows["images"]].index(image_id)

    # One process, one model load: several --text and --image values, then an --interactive session on stdin.
    long = " ".join(["red star"] * 30)
    session = _cli("query", "--index", str(index_dir), "--text", captions[7]["text"], "--text", "qqq zzz", "--text", "",
                   "--text", long, "--image", str(picture), "--k", "3", "--interactive",
                   stdin=f"{captions[7]['text']}\nimage: {tmp_path / 'nothing.png'}\n\n{captions[0]['text']}\n")
    assert session.returncode == 0, session.stderr[-3000:]
    assert (session.stdout + session.stderr).count("Reconstructed Trainable fp32 state dict") == 1
    assert _ours(session.stderr) == [
        "error: none of the words of 'qqq zzz' is in the model's vocabulary (70 words); use words its training "
        "captions use", "error: the query is empty: give a caption such as 'a red star on a blue square'",
        f"error: --image {tmp_path / 'nothing.png'} does not exist"]
    assert "Traceback" not in session.stderr
    out = "\n".join(_ours(session.stdout))
    blocks = out.split("top 3 ")[1:]
    assert len(blocks) == 5  # caption, long caption, picture, and two interactive captions
    text_block = blocks[0].splitlines()
    assert text_block[0] == f"pictures for {captions[7]['text']!r}"
    assert text_block[1].split() == ["rank", "score", "image", "id", "shard:key", "first", "caption"]
    expected = img @ cap[7]
    top = text_block[2].split()
    best = int(expected.argmax())
    assert top[0] == "1" and float(top[1]) == pytest.approx(float(expected.max()), abs=1e-4)
    record = index.rows["images"][best]
    assert top[2] == record["image_id"] and top[3] == f"builtin-test-00000{record['shard'][-5]}.tar:{record['key']}"
    assert " ".join(top[4:]) == record["caption"][:60]
    columns = [line.index(line.split()[1]) + len(line.split()[1]) for line in text_block[1:]]
    assert len(set(columns)) == 1  # scores right-aligned under their header
    assert blocks[1].splitlines()[0].startswith(f"pictures for {long[:80]!r}"[:-1])
    assert "... (269 characters)" in blocks[1].splitlines()[0]
    assert blocks[1].splitlines()[1] == "  note: cut to its first 32 of 60 words (data.max_words)"
    assert blocks[2].splitlines()[0] == f"captions for {picture}"
    top = blocks[2].splitlines()[2]
    best_caption = int((cap @ img[picture_row]).argmax())
    best_image = index.rows["images"][captions[best_caption]["image_row"]]["image_id"]
    assert top.split()[0] == "1" and top.split()[2] == best_image
    assert shorten(captions[best_caption]["text"], 80) in top
    assert blocks[3] == blocks[0]  # the interactive query answers as the --text one did

    # --json for scripts (in this process: the model loads in seconds): a picture ranks pictures, its own first
    capsys.readouterr()
    assert main(["query", "--index", str(index_dir), "--image", str(picture), "--find", "pictures", "--k", "2",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["kind"] == "image" and answer["find"] == "pictures" and len(answer["hits"]) == 2
    assert answer["hits"][0]["row"] == picture_row and answer["hits"][0]["key"] == image_id
    assert answer["hits"][0]["score"] == pytest.approx(float(img[picture_row] @ img[picture_row]), abs=1e-4)

    # A ZeRO-3 checkpoint of one rank on a launch of two: refused at once (DeepSpeed would wait forever).
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"step0000004 is a ZeRO-3 checkpoint of 1 rank\(s\); export it on 1 "
                                         r"rank\(s\) \(this launch has 2\)"):
        check_export_checkpoint(run_dir, "latest")


@pytest.mark.slow
def test_evaluate_export_and_index_use_the_recorded_share(tiny_shards, tmp_path_factory, tmp_path):
    """A copy of the shared run with another recorded share: evaluate, export and the index all score with it
    (a fixed model.local_score_weight wins over the record: test_concat_weight.py)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run(tmp_path_factory.getbasetemp(), tiny_shards), run_dir,
                    ignore=shutil.ignore_patterns("tb", "retrieval_index"))
    record = read_record(run_dir)
    assert record["chosen_on"] == "val" and record["step"] == 4  # the final evaluation chose it
    assert json.loads((run_dir / "eval" / "val.json").read_text())["concat_weight"]["local_share"] == \
        record["local_share"]
    other = 0.9 if record["local_share"] != 0.9 else 0.1  # a share the run did not choose
    record_path(run_dir).write_text(json.dumps({**record, "local_share": other}))

    test = evaluate_run(run_dir, "test")
    assert test["concat_weight"] == {"local_share": other, "local_score_weight": pytest.approx(other / (1 - other)),
                                     "chosen": False}
    assert json.loads((run_dir / "eval" / "test.json").read_text())["concat_weight"]["local_share"] == other

    payload = export(run_dir, tmp_path / "model.pt")
    assert payload["concat_weight"]["local_share"] == other
    assert torch.load(tmp_path / "model.pt", weights_only=True)["concat_weight"]["local_share"] == other

    meta = export_index(run_dir, tmp_path / "index")
    assert meta["local_share"] == other
    run = load_run(run_dir)
    assert run.model.local_share == other
    emb = embed_split(run.model, run.shardset, "test", EmbedOptions.from_config(run.cfg, run.shardset.vocab))
    img = RetrievalIndex(tmp_path / "index").faiss["images"].reconstruct_n(0, 32)
    np.testing.assert_allclose(img, concat_rows(emb["img_g"], emb["img_l"], other).numpy(), atol=1e-6)
