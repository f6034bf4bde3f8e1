r"""`--source coco`: COCO captions annotation files (captions_train2014.json style), one per split.

    python -m shards build --source coco --images coco/images \
        --annotations train=annotations/captions_train2014.json \
        --annotations val=annotations/captions_val2014.json --out data/coco --name coco

Each file has images[{id, file_name}] and annotations[{image_id, caption}]. A picture is looked up as
--images/FILE_NAME, or --images/SPLITDIR/FILE_NAME when the file name's split folder exists (COCO's
train2014/ and val2014/ layout). The image id is the COCO id. Images without captions are reported.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from shards.sources.base import (
    InputError,
    Item,
    Problems,
    Source,
    assignments,
    read_image_file,
    read_json_file,
    require,
    safe_id,
    split_assignment,
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--annotations", type=split_assignment, action="append", metavar="SPLIT=PATH",
                       help="a COCO captions file and the split it makes (repeat per split)")


def _read(path: Path) -> dict:
    data = read_json_file(path, "--annotations")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: needs 'images' and 'annotations' lists (COCO captions format)")
    return data


def _picture_path(root: Path, file_name: str) -> Path:
    # COCO 2014 names carry their folder: COCO_train2014_000000000009.jpg lives in train2014/
    parts = file_name.split("_")
    if len(parts) == 3 and (root / parts[1] / file_name).is_file():
        return root / parts[1] / file_name
    return root / file_name


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    files = assignments(args.annotations, "--annotations")
    if not files:
        raise InputError("--source coco needs --annotations SPLIT=PATH (at least train=...)")
    root = Path(require(args.images, "--images", "coco"))
    for split, file_text in files.items():
        path = Path(file_text)
        data = _read(path)
        captions: dict[object, list[tuple[str, str]]] = {}
        for k, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{k}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise InputError(f"{where}: annotation has no 'image_id'")
            caption = ann.get("caption")
            captions.setdefault(ann["image_id"], []).append(
                (caption if isinstance(caption, str) else "", f"{where} (image_id {ann['image_id']})"))
        listed = {image.get("id") for image in data["images"] if isinstance(image, dict)}
        for image_id, own in captions.items():
            if image_id not in listed:
                for _, where in own:
                    problems.bad("missing_image", where, f"image_id {image_id} is not in the file's 'images' list")
        for k, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
                raise InputError(f"{path}: images[{k}] needs 'id' and 'file_name'")
            where = f"{path}: images[{k}] (id {image['id']}, {image['file_name']})"
            own = captions.get(image["id"], [])
            picture = _picture_path(root, image["file_name"])
            yield Item(
                image_id=safe_id(str(image["id"])),
                split=split,
                captions=[c for c, _ in own],
                caption_wheres=[w for _, w in own],
                where=where,
                load=lambda picture=picture: read_image_file(picture),
            )


SOURCE = Source(add_arguments, items, shared_options=("images",))
