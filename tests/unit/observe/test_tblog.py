"""TensorBoard retrieval examples and projector (read back from the event files), and the progress-bar rules."""
import io
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from trainer.config import load_config
from trainer.data.eval_samples import iter_eval_samples
from trainer.data.shardset import ShardSet
from trainer.eval import metrics
from trainer.observe.progress import ProgressBar, progress_enabled
from trainer.observe.tb_examples import GREEN, GREY, RED, Grid, retrieval_examples, retrieval_vectors
from trainer.observe.tblog import RunLogger, event_dir
from trainer.training.loop import train

REPO = Path(__file__).resolve().parents[3]


def _split_labels(shards: Path, split: str) -> dict:
    """image_ids, captions and cap_to_img of a split in embed_split's order (one process)."""
    shardset = ShardSet.open(shards)
    ids, captions, cap_to_img = [], [], []
    for i, s in enumerate(iter_eval_samples(shardset, split, 32, 8)):
        ids.append(s["image_id"])
        captions.extend(s["captions"])
        cap_to_img.extend([i] * len(s["captions"]))
    return {"image_ids": ids, "captions": captions, "cap_to_img": torch.tensor(cap_to_img)}


def _designed_embeddings(labels: dict) -> dict:
    """Scores with known answers (global space; local zero): picture i is e_i, caption j of picture i is
    (1 - 0.01 j) e_i, except
      - the first caption of picture 0 points to picture 3 (0.9) before picture 0 (0.5),
      - picture 1 also looks like picture 2 (e_1 + 0.985 e_2): its top 5 mixes in picture 2's captions."""
    n = len(labels["image_ids"])
    cap_to_img = labels["cap_to_img"]
    img = torch.eye(n)
    img[1, 2] = 0.985
    cap = torch.zeros(len(cap_to_img), n)
    seen: dict[int, int] = {}
    for c, i in enumerate(cap_to_img.tolist()):
        j = seen.get(i, 0)
        seen[i] = j + 1
        cap[c, i] = 1 - 0.01 * j
    cap[0] = 0.0
    cap[0, 3], cap[0, 0] = 0.9, 0.5
    return {**labels, "img_g": img, "img_l": torch.zeros(n, 4), "cap_g": cap, "cap_l": torch.zeros(len(cap), 4)}


def _events(tb_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(tb_dir), size_guidance={"images": 0, "tensors": 0}).Reload()


def _image(events: EventAccumulator, tag: str, index: int = -1) -> tuple[int, Image.Image]:
    event = events.Images(tag)[index]
    return event.step, Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")


def _close(pixel, colour, tol: int = 10) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def _shard_picture(shards: Path, split: str, image_id: str, size: int) -> np.ndarray:
    """A picture read straight from the tar (not through trainer code), resized as the panels show it."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json") and json.loads(tar.extractfile(name).read()).get("image_id") == image_id:
                    png = name[: -len(".json")] + ".png"
                    with Image.open(tar.extractfile(png)) as img:
                        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.int16)
    raise AssertionError(f"{image_id} not in {split}")


def test_examples_mark_the_right_answers_and_projector_files(tiny_shards, tmp_path):
    labels = _split_labels(tiny_shards, "val")
    emb = _designed_embeddings(labels)
    grid = Grid()
    tb = RunLogger(tmp_path / "tb", enabled=True)
    tb.eval_examples(7, emb, ShardSet.open(tiny_shards), "val", local_share=0.5)
    tb.close()
    events = _events(event_dir(tmp_path / "tb"))
    assert {"examples/text_to_image", "examples/image_to_text"} <= set(events.Tags()["images"])

    # text -> image: row 0 is the first caption of picture 0; picture 3 wins, picture 0 comes second.
    step, t2i = _image(events, "examples/text_to_image")
    queries = 6  # default: the first 6 pictures' first captions
    row_h = grid.t2i_row_h()
    assert step == 7
    assert t2i.size == (grid.t2i_answer_cell(0, 5)[0] + grid.cell + grid.pad, grid.pad + queries * row_h)
    px = t2i.load()

    def frame(row: int, col: int):
        x, y = grid.t2i_cell(row, col)
        return px[x + 1, y + 1]

    assert _close(frame(0, 0), RED) and _close(frame(0, 1), GREEN)
    assert all(_close(frame(0, col), RED) for col in (2, 3, 4))
    # picture 2's first caption: its own picture first, then picture 1 (which also looks like picture 2)
    assert _close(frame(2, 0), GREEN) and _close(frame(2, 1), RED)
    for row in (1, 3, 4, 5):
        assert _close(frame(row, 0), GREEN) and all(_close(frame(row, c), RED) for c in range(1, 5))
    x, y = grid.t2i_answer_cell(0, 5)
    assert _close(px[x + 1, y + 1], GREY)
    # inside the frames: the pictures themselves (picture 3 top-ranked, picture 0 as the answer of row 0)
    ids = labels["image_ids"]
    for (x, y), image_id in ((grid.t2i_cell(0, 0), ids[3]), (grid.t2i_answer_cell(0, 5), ids[0])):
        inner = np.asarray(t2i.crop((x + grid.frame, y + grid.frame, x + grid.frame + grid.thumb,
                                     y + grid.frame + grid.thumb)), dtype=np.int16)
        assert np.abs(inner - _shard_picture(tiny_shards, "val", image_id, grid.thumb)).mean() < 3

    # image -> text: picture 1 ranks picture 2's captions between its own; the others only their own.
    _, i2t = _image(events, "examples/image_to_text")
    assert i2t.size == (grid.pad + grid.cell + grid.pad + grid.text_w + grid.pad,
                        grid.pad + queries * grid.i2t_row_h(5))
    px = i2t.load()

    def marker(row: int, line: int):
        x0, y0, x1, y1 = grid.i2t_marker(row, line, 5)
        return px[(x0 + x1) // 2, (y0 + y1) // 2]

    assert [_close(marker(1, line), GREEN) for line in range(5)] == [True, True, False, True, False]
    assert all(_close(marker(1, line), RED) for line in (2, 4))
    for row in (0, 2, 3, 4, 5):
        assert all(_close(marker(row, line), GREEN) for line in range(5)), row

    # projector: the first pictures (all 32 here) and their 160 captions, thumbnails in the sprite
    n_pictures, n_captions = 32, 160
    folder = event_dir(tmp_path / "tb") / "00007" / "val_retrieval_vectors"
    config = (event_dir(tmp_path / "tb") / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "val_retrieval_vectors:00007"' in config and "single_image_dim: 48" in config
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    img, cap = retrieval_vectors(emb, 0.5)
    np.testing.assert_allclose(tensors, torch.cat([img, cap]).numpy(), atol=1e-6)
    meta = (folder / "metadata.tsv").read_text().splitlines()
    assert meta[0].split("\t") == ["modality", "text", "image_id"] and len(meta) == 1 + n_pictures + n_captions
    assert meta[1].split("\t")[0::2] == ["picture", ids[0]]
    assert meta[1 + n_pictures].split("\t") == ["caption", labels["captions"][0], ids[0]]
    sprite = np.asarray(Image.open(folder / "sprite.png").convert("RGB"))
    side = math.ceil(math.sqrt(n_pictures + n_captions))
    assert sprite.shape == (side * 48, side * 48, 3)
    tiles = sprite.reshape(side, 48, side, 48, 3).swapaxes(1, 2).reshape(side * side, 48, 48, 3)
    assert [bool(t.any()) for t in tiles] == [True] * (n_pictures + n_captions) + [False] * (side * side - 192)
    first = _shard_picture(tiny_shards, "val", ids[0], 96)
    thumb = np.asarray(Image.fromarray(first.astype(np.uint8)).resize((48, 48), Image.BILINEAR), dtype=np.int16)
    assert np.abs(tiles[0].astype(np.int16) - thumb).mean() < 3


def test_examples_score_like_the_concat_evaluation():
    """Random global and local parts: the answer ranks are trainer.eval.metrics' concat t2i ranks, not the global
    ones."""
    gen = torch.Generator().manual_seed(0)
    n, per = 40, 3
    cap_to_img = torch.arange(n).repeat_interleave(per)
    emb = {"img_g": torch.randn(n, 8, generator=gen), "img_l": torch.randn(n, 8, generator=gen),
           "cap_g": torch.randn(n * per, 8, generator=gen), "cap_l": torch.randn(n * per, 8, generator=gen),
           "cap_to_img": cap_to_img, "captions": [f"caption {c}" for c in range(n * per)],
           "image_ids": [f"img{i}" for i in range(n)]}
    share = 0.7
    examples = retrieval_examples(emb, share, num_queries=n, k=5)
    img_cat = torch.cat([math.sqrt(1 - share) * emb["img_g"], math.sqrt(share) * emb["img_l"]], 1)
    cap_cat = torch.cat([math.sqrt(1 - share) * emb["cap_g"], math.sqrt(share) * emb["cap_l"]], 1)
    _, t2i = metrics.retrieval_ranks(img_cat, cap_cat, cap_to_img)
    _, t2i_global = metrics.retrieval_ranks(emb["img_g"], emb["cap_g"], cap_to_img)
    firsts = torch.arange(n) * per
    assert [q["answer_rank"] for q in examples["text_to_image"]] == t2i[firsts].tolist()
    assert t2i[firsts].tolist() != t2i_global[firsts].tolist()  # the test tells the two scores apart
    q = examples["text_to_image"][5]
    expected = img_cat @ cap_cat[5 * per]
    assert [i for i, _ in q["top"]] == torch.argsort(expected, descending=True)[:5].tolist()
    assert [s for _, s in q["top"]] == pytest.approx(torch.sort(expected, descending=True).values[:5].tolist())
    top = examples["image_to_text"][7]["top"]
    own = [emb["cap_to_img"][int(text.split()[1])] == 7 for text, _, _ in top]
    assert [is_own for _, _, is_own in top] == own


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_rank_zero_at_a_terminal(tmp_path):
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w") as terminal, open(tmp_path / "log.txt", "w") as log_file:
            assert progress_enabled(0, terminal)
            assert not progress_enabled(1, terminal) and not progress_enabled(3, terminal)
            assert not progress_enabled(0, log_file)  # a job log: plain log lines only
            assert not progress_enabled(0, io.StringIO())
        assert not progress_enabled(0, terminal)  # closed
    finally:
        os.close(leader)


def test_progress_bar_counts_samples_and_keeps_postfixes_or_draws_nothing():
    """Our part, not tqdm's formatting: what the bar counts, which postfix it shows, that disabled means silent."""
    out = _Tty()
    bar = ProgressBar(total=1000, desc="train", unit="sample", stream=out)
    bar.update(100, step="1/10")
    bar.update(100, loss="0.5000")
    bar.update(100, step="3/10")
    assert bar.count == 300
    assert bar._bar.postfix == "step=3/10, loss=0.5000"  # a postfix given once stays until replaced
    assert (bar._bar.total, bar._bar.unit, bar._bar.desc) == (1000, "sample", "train")
    bar.close()
    bar.close()  # closing twice is harmless (the loop closes on every exit path)
    assert out.getvalue()

    quiet = _Tty()
    bar = ProgressBar(total=1000, desc="train", enabled=False, stream=quiet)
    bar.update(500, step="5/10")
    bar.close()
    assert quiet.getvalue() == "" and bar.count == 0


@pytest.mark.slow
def test_training_writes_examples_at_each_evaluation(tiny_shards, tmp_path):
    out = tmp_path / "run"
    train(load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"run.out_dir={out}", "data.num_workers=1", "data.shuffle_buffer=256",
        "data.batch_size=16", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "train.steps=4", "train.log_every=2", "train.eval_every=2", "train.ckpt_every=0"]))
    events = _events(event_dir(out / "tb"))
    for tag in ("examples/text_to_image", "examples/image_to_text"):
        assert [e.step for e in events.Images(tag)] == [2, 4], tag
    _, panel = _image(events, "examples/text_to_image")
    assert panel.size[1] == Grid().pad + 6 * Grid().t2i_row_h()
    for step in ("00002", "00004"):
        folder = event_dir(out / "tb") / step / "val_retrieval_vectors"
        assert len((folder / "tensors.tsv").read_text().splitlines()) == 32 + 160
        assert (folder / "sprite.png").is_file()


def test_recall_charts_draw_one_curve_per_score(tmp_path):
    """Each custom-scalars chart (a split and metric) matches one tag, written by three runs named after the
    scores: TensorBoard colours series by run, so global, local and concat get three colours and names."""
    tb = RunLogger(tmp_path / "tb", enabled=True)
    tb.retrieval_layout(["val", "test"])
    recalls = {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum": 6.0}
    for split in ("val", "test"):
        tb.retrieval(3, split, {score: recalls for score in ("global", "local", "concat")})
    tb.close()
    main = event_dir(tmp_path / "tb")
    events = _events(main)
    layout_proto = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(layout_proto)
    assert sorted(c.title for c in layout.category) == ["retrieval test", "retrieval val"]
    score_tags = {score: _events(main / score).Tags()["scalars"] for score in ("global", "local", "concat")}
    for category in layout.category:
        split = category.title.split()[1]
        assert len(category.chart) == 7
        for chart in category.chart:
            for score, tags in score_tags.items():
                drawn = [tag for tag in tags if any(re.search(r, tag) for r in chart.multiline.tag)]
                assert drawn == [f"recall_{split}/{chart.title}"], (score, chart.title)
            # the main run's per-score tags stay for the plain scalars dashboard and scripts
            assert all(f"eval_{split}/{s}/{chart.title}" in events.Tags()["scalars"] for s in score_tags)


def test_the_run_is_named_after_its_folder_and_bad_counts_wait_for_a_bad_sample(tmp_path):
    run = tmp_path / "my_run"
    tb = RunLogger(run / "tb", enabled=True)
    tb.scalars(1, {"loss/loss": 1.0, "data/bad/missing_json": 0, "data/bad/truncated_tar": 0})
    tb.scalars(2, {"loss/loss": 0.9, "data/bad/missing_json": 2, "data/bad/truncated_tar": 0})
    tb.scalars(3, {"loss/loss": 0.8, "data/bad/missing_json": 2, "data/bad/truncated_tar": 0})
    tb.hparams({"train": {"steps": 3}}, {"concat": {"rsum": 1.0}}, "test")
    tb.close()
    assert event_dir(run / "tb") == run / "tb" / "my_run"  # `tensorboard --logdir RUN/tb` lists "my_run"
    scalars = _events(run / "tb" / "my_run").Tags()["scalars"]
    assert "data/bad/truncated_tar" not in scalars  # never bad: no flat-zero chart
    events = _events(run / "tb" / "my_run")
    assert [(e.step, e.value) for e in events.Scalars("data/bad/missing_json")] == [(2, 2.0), (3, 2.0)]
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 3]


def test_shards_progress_is_plain_lines_away_from_a_terminal():
    from shards.progress import PlainProgress, progress

    stream = io.StringIO()
    bar = progress(10, "writing", stream=stream)
    assert isinstance(bar, PlainProgress)
    bar.interval = 0.0  # a line at every update (10 s in a real build)
    with bar:
        bar.update(4)
        bar.update(6)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("writing: 4/10 img (40%)") and lines[-1].startswith("writing: 10/10 img (100%)")
    assert lines[-1].endswith(", done")


def test_deepspeeds_cpu_accelerator_notice_is_filtered_and_other_warnings_are_not():
    import logging

    import trainer  # noqa: F401  (installs trainer.observe.quiet)

    logger = logging.getLogger("DeepSpeed")
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert kept == ["something else"]


def test_progress_bar_draws_on_a_terminal_that_reports_no_size():
    """A fresh pty is 0 x 0 (as under `script` or some job runners), where plain tqdm draws nothing."""
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w") as terminal:
            assert os.get_terminal_size(terminal.fileno()).columns == 0
            bar = ProgressBar(total=100, desc="embed val", unit="img", stream=terminal)
            fixed = (bar._bar.ncols, bar._bar.nrows)
            bar.update(50)
            bar.close()
            text = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
    assert fixed == (100, 20)  # our fixed size in place of the terminal's 0 x 0
    assert "embed val" in text  # so the bar was drawn
