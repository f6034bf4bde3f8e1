"""Retrieval examples and the embedding projector for TensorBoard, drawn from one evaluation's embeddings.

Everything is scored as evaluation scores (trainer.eval.metrics, "concat"): rows [sqrt(1 - a) g; sqrt(a) l], a the
local share the evaluation used (chosen on the validation split under model.local_score_weight=auto), and inner
products, ties counted against the right answer. The query sets are fixed (the first pictures of the split in
embed_split's order, and the first caption of each), so the images of successive evaluations compare.

- examples/text_to_image: per query caption (drawn above), its top-k pictures of the whole split, framed green
  where the picture is the caption's own and red elsewhere; the last column is the right picture and its rank.
- examples/image_to_text: per query picture, its top-k captions of the whole split beside it, each with a green
  (own caption) or red marker.
- projector: the first pictures and all their captions in one matrix, with thumbnails (sprite) and metadata
  columns modality, text and image_id.

Pictures are re-read from the split's shards by image id (only the ones shown are decoded), so evaluation
keeps no pixels. Used by trainer.observe.tblog.RunLogger.eval_examples on rank 0.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from trainer.data.samples import parse_meta, picture_bytes
from trainer.data.shardset import ShardSet
from trainer.eval.metrics import concat_rows

FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
GREEN = (0, 170, 0)
RED = (220, 30, 30)
GREY = (150, 150, 150)
WHITE = (255, 255, 255)
TEXT = (20, 20, 20)


@functools.lru_cache(maxsize=None)  # loading a TrueType face takes milliseconds; a projector draws thousands of tiles
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where installed (fonts-dejavu-core), else Pillow's built-in font at the same size."""
    if FONT_FILE.is_file():
        return ImageFont.truetype(str(FONT_FILE), size)
    return ImageFont.load_default(size)


def retrieval_vectors(emb: dict, local_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Picture and caption rows scored as evaluation's "concat": [sqrt(1 - a) g; sqrt(a) l] (just g without a
    local space)."""
    if emb.get("img_l") is None:
        return emb["img_g"].float(), emb["cap_g"].float()
    return (concat_rows(emb["img_g"].float(), emb["img_l"].float(), local_share),
            concat_rows(emb["cap_g"].float(), emb["cap_l"].float(), local_share))


def first_captions(cap_to_img: torch.Tensor, num_images: int) -> list[int]:
    """Row of the first caption of each of the first `num_images` pictures."""
    first: dict[int, int] = {}
    for row, image in enumerate(cap_to_img.tolist()):
        if image < num_images and image not in first:
            first[image] = row
    return [first[i] for i in range(num_images) if i in first]


def read_pictures(shardset: ShardSet, split: str, image_ids: set[str], size: int) -> dict[str, Image.Image]:
    """The pictures with these ids, as RGB squares of `size` pixels; reads the split's shards in order and stops
    once all are found. Only matching samples are decoded."""
    found: dict[str, Image.Image] = {}
    for url in shardset.urls(split):
        for sample in wds.tarfile_to_samples()([{"url": url}]):
            key = sample.get("__key__", "?")
            if "json" not in sample:
                continue  # evaluation itself refuses such a shard; here it only means "not a wanted picture"
            image_id = parse_meta(sample["json"], key, shardset.num_concepts)["image_id"]
            if image_id in image_ids and image_id not in found:
                with Image.open(io.BytesIO(picture_bytes(sample))) as img:
                    found[image_id] = img.convert("RGB").resize((size, size), Image.BILINEAR)
            if len(found) == len(image_ids):
                return found
    missing = sorted(image_ids - found.keys())
    raise ValueError(f"split {split!r} of {shardset.root}: pictures {missing[:5]} (of {len(missing)} missing) are "
                     f"not in its shards; did the shards change since they were embedded?")


@dataclass(frozen=True)
class Grid:
    """Pixel geometry of the example panels (shared with the tests that look for the frames)."""

    thumb: int = 96
    frame: int = 4
    pad: int = 8
    caption_h: int = 22  # caption line above a text->image row
    label_h: int = 18    # rank/score line under each picture
    line_h: int = 20     # one caption line of an image->text row
    text_w: int = 560    # caption column of an image->text row

    @property
    def cell(self) -> int:
        return self.thumb + 2 * self.frame

    def t2i_row_h(self) -> int:
        return self.caption_h + self.cell + self.label_h + self.pad

    def t2i_cell(self, row: int, col: int) -> tuple[int, int]:
        """Top-left corner of the frame of ranked column `col` (0-based) of a row."""
        x = self.pad + col * (self.cell + self.pad)
        return x, self.pad + row * self.t2i_row_h() + self.caption_h

    def t2i_answer_cell(self, row: int, k: int) -> tuple[int, int]:
        x, y = self.t2i_cell(row, k)
        return x + 3 * self.pad, y  # set apart from the ranked columns

    def i2t_row_h(self, k: int) -> int:
        return max(self.cell, k * self.line_h) + self.pad

    def i2t_marker(self, row: int, line: int, k: int) -> tuple[int, int, int, int]:
        """Box of the coloured marker in front of caption `line` of picture `row`."""
        x = self.pad + self.cell + self.pad
        y = self.pad + row * self.i2t_row_h(k) + line * self.line_h + 4
        return x, y, x + 10, y + 10


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def _framed(canvas: Image.Image, picture: Image.Image, xy: tuple[int, int], colour, grid: Grid) -> None:
    x, y = xy
    ImageDraw.Draw(canvas).rectangle([x, y, x + grid.cell - 1, y + grid.cell - 1], fill=colour)
    canvas.paste(picture, (x + grid.frame, y + grid.frame))


def text_to_image_panel(queries: list[dict], pictures: dict[int, Image.Image], grid: Grid = Grid()) -> Image.Image:
    """One row per query {caption, top: [(image row, score)], answer: image row, answer_rank (0-based)}."""
    k = len(queries[0]["top"])
    width = grid.t2i_answer_cell(0, k)[0] + grid.cell + grid.pad
    canvas = Image.new("RGB", (width, grid.pad + len(queries) * grid.t2i_row_h()), WHITE)
    draw = ImageDraw.Draw(canvas)
    big, small = font(15), font(12)
    for row, q in enumerate(queries):
        x0, y0 = grid.t2i_cell(row, 0)
        draw.text((x0, y0 - grid.caption_h + 2), _fit(draw, f'"{q["caption"]}"', big, width - 2 * grid.pad),
                  fill=TEXT, font=big)
        for col, (image, score) in enumerate(q["top"]):
            xy = grid.t2i_cell(row, col)
            _framed(canvas, pictures[image], xy, GREEN if image == q["answer"] else RED, grid)
            draw.text((xy[0], xy[1] + grid.cell + 2), f"#{col + 1}  {score:+.3f}", fill=TEXT, font=small)
        xy = grid.t2i_answer_cell(row, k)
        _framed(canvas, pictures[q["answer"]], xy, GREY, grid)
        draw.text((xy[0], xy[1] + grid.cell + 2), f"answer: #{q['answer_rank'] + 1}", fill=TEXT, font=small)
    return canvas


def image_to_text_panel(queries: list[dict], pictures: dict[int, Image.Image], grid: Grid = Grid()) -> Image.Image:
    """One row per query {image: row, top: [(caption text, score, is_own)]}: the picture, its captions beside."""
    k = len(queries[0]["top"])
    width = grid.pad + grid.cell + grid.pad + grid.text_w + grid.pad
    canvas = Image.new("RGB", (width, grid.pad + len(queries) * grid.i2t_row_h(k)), WHITE)
    draw = ImageDraw.Draw(canvas)
    fnt = font(14)
    for row, q in enumerate(queries):
        _framed(canvas, pictures[q["image"]], (grid.pad, grid.pad + row * grid.i2t_row_h(k)), GREY, grid)
        for line, (text, score, own) in enumerate(q["top"]):
            box = grid.i2t_marker(row, line, k)
            draw.rectangle(box, fill=GREEN if own else RED)
            label = _fit(draw, f"#{line + 1} {score:+.3f}  {text}", fnt, grid.text_w - 16)
            draw.text((box[2] + 6, box[1] - 3), label, fill=GREEN if own else RED, font=fnt)
    return canvas


def retrieval_examples(emb: dict, local_share: float, num_queries: int = 6, k: int = 5) -> dict:
    """The example queries and their top k: {"text_to_image": [...], "image_to_text": [...]} (see the panels)."""
    img, cap = retrieval_vectors(emb, local_share)
    cap_to_img = emb["cap_to_img"]
    num_images = img.shape[0]
    k = min(k, num_images, cap.shape[0])
    t2i = []
    for c in first_captions(cap_to_img, min(num_queries, num_images)):
        scores = img @ cap[c]
        answer = int(cap_to_img[c])
        top = torch.topk(scores, k)
        t2i.append({"caption": emb["captions"][c], "answer": answer,
                    # rank as trainer.eval.metrics counts it: every other picture scoring >= the right one is above it
                    "answer_rank": int((scores >= scores[answer]).sum()) - 1,
                    "top": [(int(i), float(s)) for s, i in zip(top.values, top.indices)]})
    i2t = []
    for i in range(min(num_queries, num_images)):
        top = torch.topk(cap @ img[i], k)
        i2t.append({"image": i, "top": [(emb["captions"][int(c)], float(s), int(cap_to_img[c]) == i)
                                        for s, c in zip(top.values, top.indices)]})
    return {"text_to_image": t2i, "image_to_text": i2t}


def caption_tile(text: str, size: int) -> Image.Image:
    """A projector thumbnail for a caption: its words on a pale tile, so captions and pictures tell apart."""
    tile = Image.new("RGB", (size, size), (235, 240, 255))
    draw = ImageDraw.Draw(tile)
    fnt = font(max(7, size // 6))
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=fnt) > size - 2:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    for n, text_line in enumerate(lines[: size // (fnt.size + 1)]):
        draw.text((1, 1 + n * (fnt.size + 1)), text_line, fill=(0, 0, 120), font=fnt)
    return tile


def _tsv_safe(text: str) -> str:
    return " ".join(str(text).split())  # the projector's metadata.tsv has one line per row and tab columns


def projector_rows(emb: dict, local_share: float, pictures: dict[int, Image.Image], num_images: int,
                   thumb: int) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
    """(vectors, metadata rows [modality, text, image_id], thumbnails [N, 3, thumb, thumb] in [0, 1]) of the
    first `num_images` pictures followed by all their captions."""
    img, cap = retrieval_vectors(emb, local_share)
    num_images = min(num_images, img.shape[0])
    caps = [c for c, i in enumerate(emb["cap_to_img"].tolist()) if i < num_images]
    vectors = torch.cat([img[:num_images], cap[caps]])
    ids = emb["image_ids"]
    meta = [["picture", _tsv_safe(f"[picture {ids[i]}]"), _tsv_safe(ids[i])] for i in range(num_images)]
    meta += [["caption", _tsv_safe(emb["captions"][c]), _tsv_safe(ids[int(emb["cap_to_img"][c])])] for c in caps]
    tiles = [pictures[i].resize((thumb, thumb), Image.BILINEAR) for i in range(num_images)]
    tiles += [caption_tile(emb["captions"][c], thumb) for c in caps]
    thumbs = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])).permute(0, 3, 1, 2)
    return vectors, meta, thumbs.float() / 255.0


@dataclass(frozen=True)
class ExampleOptions:
    """How much one evaluation shows: queries per panel, hits per query, the panels' geometry, and how many
    pictures (with their captions) the projector gets, at what thumbnail size."""

    num_queries: int = 6
    k: int = 5
    grid: Grid = Grid()
    projector_images: int = 256
    projector_thumb: int = 48


def log_eval_examples(writer, step: int, emb: dict, shardset: ShardSet, split: str, local_share: float,
                      options: ExampleOptions = ExampleOptions()) -> None:
    """Write examples/text_to_image, examples/image_to_text and a projector embedding for one evaluation."""
    num_queries, k, grid = options.num_queries, options.k, options.grid
    projector_images, projector_thumb = options.projector_images, options.projector_thumb
    examples = retrieval_examples(emb, local_share, num_queries, k)
    rows = {i for q in examples["text_to_image"] for i, _ in q["top"]}
    rows |= {q["answer"] for q in examples["text_to_image"]} | {q["image"] for q in examples["image_to_text"]}
    num_proj = min(projector_images, emb["img_g"].shape[0])
    rows |= set(range(num_proj))
    ids = emb["image_ids"]
    by_id = read_pictures(shardset, split, {ids[r] for r in rows}, grid.thumb)
    pictures = {r: by_id[ids[r]] for r in rows}
    for tag, panel in (("text_to_image", text_to_image_panel), ("image_to_text", image_to_text_panel)):
        if examples[tag]:
            image = np.asarray(panel(examples[tag], pictures, grid), dtype=np.uint8)
            writer.add_image(f"examples/{tag}", image, step, dataformats="HWC")
    if num_proj:
        vectors, meta, thumbs = projector_rows(emb, local_share, pictures, num_proj, projector_thumb)
        writer.add_embedding(vectors, metadata=meta, label_img=thumbs, global_step=step,
                             tag=f"{split}_retrieval_vectors", metadata_header=["modality", "text", "image_id"])
