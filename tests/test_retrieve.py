"""trainer.retrieve: export a ZeRO-3 run's test split to an index folder, then query it by text and by picture."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.evaluate import embed_split
from trainer.retrieve import export_index, load_run, main, query_index
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """A new process, as a user would run it (without this process's RANK/MASTER_PORT: a world of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run([sys.executable, "-m", "trainer.retrieve", *args], capture_output=True, text=True,
                          cwd=REPO, env=env)


def _first_test_picture(shards: Path, out: Path) -> tuple[Path, str]:
    """The first picture of the test split's first shard, written to a file, and its image id."""
    manifest = json.loads((shards / "manifest.json").read_text())
    with tarfile.open(shards / manifest["splits"]["test"]["shards"][0]) as tar:
        members = tar.getmembers()
        png = next(m for m in members if m.name.endswith(".png"))
        key = png.name[: -len(".png")]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        path = out / "query.png"
        path.write_bytes(tar.extractfile(png).read())
    return path, meta.get("image_id", key)


def test_query_needs_one_query_and_an_existing_index(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before any process group exists
        main(["query", "--index", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "one of the arguments --text --image is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one query"):
        query_index(tmp_path, k=3)
    with pytest.raises(ValueError, match="exactly one query"):
        query_index(tmp_path, text="a red star", image_path=tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="index folder .*missing_index does not exist"):
        query_index(tmp_path / "missing_index", text="a red star")
    with pytest.raises(FileNotFoundError, match="lacks index.json"):
        query_index(tmp_path, text="a red star")


@pytest.mark.slow
def test_export_and_query_a_zero3_run(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"run.out_dir={run_dir}", "data.num_workers=1", "data.shuffle_buffer=256",
        f"engine.deepspeed_config={REPO}/configs/deepspeed/zero3.json", "engine.precision=fp32",
        "data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=0"]))

    index_dir = tmp_path / "index"
    meta = export_index(run_dir, index_dir)  # what `export --run RUN --out INDEX` does, minus the shutdown
    assert meta["split"] == "test" and meta["counts"] == {"images": 32, "captions": 160}
    assert meta["checkpoint_tag"] == "step0000004" and meta["step"] == 4
    assert json.loads((index_dir / "index.json").read_text()) == meta
    assert Path(meta["config"]).is_file()

    img = np.load(index_dir / "image_vectors.npy")
    cap = np.load(index_dir / "caption_vectors.npy")
    images = json.loads((index_dir / "images.json").read_text())
    captions = json.loads((index_dir / "captions.json").read_text())
    assert img.dtype == cap.dtype == np.float32
    # local space on (builtin config): [g; sqrt(w) l] has twice the embedding width
    assert img.shape == (32, 64) and cap.shape == (160, 64) and meta["dim"] == 64
    assert len(images) == 32 and len(set(images)) == 32 and len(captions) == 160
    assert all(0 <= c["image_row"] < 32 for c in captions)

    # The rows are embed_split's vectors of the same checkpoint, concatenated by the model.
    run = load_run(run_dir)
    cfg = run.cfg
    emb = embed_split(run.model, run.shardset, "test", image_size=cfg.data.image_size,
                      max_words=cfg.data.max_words, batch_size=cfg.data.eval_batch_size)
    w = cfg.model.local_score_weight
    np.testing.assert_allclose(img, torch.cat([emb["img_g"], w ** 0.5 * emb["img_l"]], 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(cap, torch.cat([emb["cap_g"], w ** 0.5 * emb["cap_l"]], 1).numpy(), atol=1e-6)
    assert images == emb["image_ids"] and [c["text"] for c in captions] == emb["captions"]
    assert [c["image_row"] for c in captions] == emb["cap_to_img"].tolist()

    # A caption of the index as the text query: the scores are that caption's row against every picture.
    c = 7
    hits = query_index(index_dir, text=captions[c]["text"], k=32)
    expected = img @ cap[c]
    assert [h["rank"] for h in hits] == list(range(1, 33)) and sorted(h["row"] for h in hits) == list(range(32))
    assert hits[0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    for h in hits:
        assert h["score"] == pytest.approx(float(expected[h["row"]]), abs=1e-5)
        assert h["image_id"] == images[h["row"]]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # A picture file taken from the shards as the query: its own captions score as in the index.
    picture, image_id = _first_test_picture(tiny_shards, tmp_path)
    row = images.index(image_id)
    hits = query_index(index_dir, image_path=picture, k=160, run=run)  # the same checkpoint, loaded once
    assert hits[0]["score"] == pytest.approx(float((cap @ img[row]).max()), abs=1e-5)
    own = [h for h in hits if h["image_row"] == row]
    assert len(own) == sum(c["image_row"] == row for c in captions) > 0
    for h in own:
        assert h["image_id"] == image_id and h["caption"] == captions[h["row"]]["text"]
        assert h["score"] == pytest.approx(float(cap[h["row"]] @ img[row]), abs=1e-5)

    # The command line, in a fresh process: the top picture for a caption of the index.
    cli = _cli("query", "--index", str(index_dir), "--text", captions[c]["text"], "--k", "3")
    assert cli.returncode == 0, cli.stderr[-3000:]
    # DeepSpeed logs to stdout too: the hits are the lines after our header.
    lines = cli.stdout.split(f"top 3 images for {captions[c]['text']!r}")[1].strip().splitlines()[1:]
    assert len(lines) == 3
    top = lines[0].split()
    assert top[0] == "1" and top[2] == images[int(expected.argmax())]
    assert float(top[1]) == pytest.approx(float(expected.max()), abs=1e-4)

    cli = _cli("query", "--index", str(tmp_path / "missing_index"), "--text", "a red star")
    assert cli.returncode == 2 and "missing_index does not exist" in cli.stderr
