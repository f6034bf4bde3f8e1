"""The built-in procedural corpus: pictures of 2-4 coloured shapes with five captions each.

It needs nothing outside the project, so the whole pipeline (shards, training, evaluation) runs anywhere.
Captions mention different subsets of a picture's objects, so captions of different pictures share
concepts and a short caption ("a red star") fits many pictures, as in real caption corpora.

Scenes are laid out on a 3x3 grid of cells, one object per cell, so objects never overlap and every
position phrase has a crisp meaning (see POSITION_PHRASES and RELATIONS).
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from shards.writer import RawSample

GRID = 3
MIN_IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges without a slow anti-aliasing path

# shape -> (singular, plural) pairs; the first pair is the plain name, the others are synonyms
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"),),
    "heart": (("heart", "hearts"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "ring": (("ring", "rings"), ("donut", "donuts")),
}
SHAPES = tuple(SHAPE_NOUNS)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (250, 215, 0),
    "green": (20, 150, 40),
    "blue": (25, 70, 225),
    "purple": (125, 40, 165),
    "pink": (250, 110, 190),
    "black": (20, 20, 20),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# object radius as a fraction of a grid cell
SIZE_RADIUS = {"small": 0.25, "large": 0.40}

# pale backgrounds, so every object colour stands out
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((228, 228, 228), (235, 228, 212), (215, 225, 235), (222, 232, 218))
TEXTURES = ("plain", "noise", "gradient")

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

# phrase -> does it hold for an object in cell (row, col)
POSITION_PHRASES: dict[str, Callable[[int, int], bool]] = {
    "on the left": lambda r, c: c == 0,
    "on the left side": lambda r, c: c == 0,
    "on the right": lambda r, c: c == GRID - 1,
    "on the right side": lambda r, c: c == GRID - 1,
    "at the top": lambda r, c: r == 0,
    "near the top": lambda r, c: r == 0,
    "at the bottom": lambda r, c: r == GRID - 1,
    "near the bottom": lambda r, c: r == GRID - 1,
    "in the top left corner": lambda r, c: (r, c) == (0, 0),
    "at the top left": lambda r, c: (r, c) == (0, 0),
    "in the top right corner": lambda r, c: (r, c) == (0, GRID - 1),
    "at the top right": lambda r, c: (r, c) == (0, GRID - 1),
    "in the bottom left corner": lambda r, c: (r, c) == (GRID - 1, 0),
    "at the bottom left": lambda r, c: (r, c) == (GRID - 1, 0),
    "in the bottom right corner": lambda r, c: (r, c) == (GRID - 1, GRID - 1),
    "at the bottom right": lambda r, c: (r, c) == (GRID - 1, GRID - 1),
    "in the centre": lambda r, c: (r, c) == (1, 1),
    "in the middle": lambda r, c: (r, c) == (1, 1),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    cx: float  # centre and radius in pixels of Scene.image_size
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: tuple[int, int, int]
    texture: str
    texture_seed: int
    objects: tuple[SceneObject, ...]


# relation phrase -> does it hold between objects a and b ("a <phrase> b")
RELATIONS: dict[str, Callable[[SceneObject, SceneObject], bool]] = {
    "to the left of": lambda a, b: a.col < b.col,
    "to the right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
    "next to": lambda a, b: max(abs(a.row - b.row), abs(a.col - b.col)) == 1,
}


def generate_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """2-4 objects in distinct grid cells; shapes and colours repeat now and then so counts occur."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    cell = image_size / GRID
    n_objects = int(rng.integers(2, 5))
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    objects: list[SceneObject] = []
    for cell_index in cells:
        if objects and rng.random() < 0.15:
            # an exact repeat of an earlier object's look, so "two green triangles" shows up
            twin = objects[int(rng.integers(len(objects)))]
            shape, colour = twin.shape, twin.colour
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = "large" if rng.random() < 0.5 else "small"
        row, col = divmod(int(cell_index), GRID)
        radius = SIZE_RADIUS[size] * cell
        slack = max(0.0, 0.5 * cell - radius - 0.06 * cell)  # keep a margin to the cell border
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(SceneObject(shape, colour, size, row, col, float(cx), float(cy), float(radius)))
    return Scene(
        image_size=image_size,
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        texture_seed=int(rng.integers(2**31)),
        objects=tuple(objects),
    )


def _background(scene: Scene, image_size: int) -> np.ndarray:
    base = np.array(scene.background, dtype=np.float32)
    pixels = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    rng = np.random.default_rng(scene.texture_seed)
    if scene.texture == "noise":
        pixels += rng.normal(0.0, 4.0, size=(image_size, image_size, 1)).astype(np.float32)
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
        field = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
        pixels += 10.0 * field[:, :, None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = r if k % 2 == 0 else r * inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # the classic parametric heart, scaled so it spans about 2r and is centred on (cx, cy)
    scale = r / 16.5
    out = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((cx + scale * x, cy - scale * (y + 2.5)))
    return out


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                 fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.42 * r)))
    elif shape == "square":
        h = 0.82 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)], fill=fill)
    elif shape == "triangle":
        # equilateral, pointing up, enlarged a little (its area is small for its span) and shifted down
        # by a quarter of its circumradius so its bounding box is centred
        big_r = 1.15 * r
        top, base = cy - 0.75 * big_r, cy + 0.75 * big_r
        draw.polygon([(cx, top), (cx + 0.866 * big_r, base), (cx - 0.866 * big_r, base)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy + 0.08 * r, r * 1.08), fill=fill)
    elif shape == "cross":
        a = 0.3 * r
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB picture of image_size x image_size (any size: positions scale with it)."""
    background = Image.fromarray(_background(scene, image_size), "RGB")
    big = image_size * SUPERSAMPLE
    canvas = background.resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    scale = big / scene.image_size
    for obj in scene.objects:
        _draw_object(draw, obj.shape, obj.cx * scale, obj.cy * scale, obj.radius * scale, COLOURS[obj.colour])
    return canvas.reduce(SUPERSAMPLE)


# ---------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(shape: str, rng: np.random.Generator, plural: bool = False) -> str:
    singular, plural_form = _pick(rng, SHAPE_NOUNS[shape])
    return plural_form if plural else singular


def _object_phrase(obj: SceneObject, rng: np.random.Generator, colour_p: float, size_p: float) -> str:
    words = []
    if rng.random() < size_p:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    if rng.random() < colour_p:
        words.append(obj.colour)
    words.append(_noun(obj.shape, rng))
    return _with_article(" ".join(words))


def _position_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    return _pick(rng, [p for p, holds in POSITION_PHRASES.items() if holds(obj.row, obj.col)])


def _placed_phrase(obj: SceneObject, rng: np.random.Generator, position_p: float) -> str:
    phrase = _object_phrase(obj, rng, colour_p=0.85, size_p=0.35)
    if rng.random() < position_p:
        phrase += " " + _position_phrase(obj, rng)
    return phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _group_phrase(scene: Scene, members: list[SceneObject], rng: np.random.Generator) -> str | None:
    """"two green triangles" for objects sharing a shape, only when the count is exact for the scene."""
    shape = members[0].shape
    same_shape = [o for o in scene.objects if o.shape == shape]
    if len(same_shape) != len(members):
        return None
    colours = {o.colour for o in members}
    colour = ""
    if len(colours) == 1 and rng.random() < 0.8:
        (colour,) = colours
        colour += " "
    return f"{NUMBER_WORDS[len(members)]} {colour}{_noun(shape, rng, plural=True)}"


def _units(scene: Scene, subset: list[SceneObject], rng: np.random.Generator, position_p: float) -> list[str]:
    """Phrases for the subset: objects sharing a shape may be counted together, the rest one by one."""
    units: list[str] = []
    done: set[int] = set()
    for i, obj in enumerate(subset):
        if i in done:
            continue
        mates = [j for j in range(i, len(subset)) if subset[j].shape == obj.shape]
        group = _group_phrase(scene, [subset[j] for j in mates], rng) if len(mates) > 1 else None
        if group is not None and rng.random() < 0.7:
            units.append(group)
            done.update(mates)
        else:
            units.append(_placed_phrase(obj, rng, position_p))
            done.add(i)
    return units


def _caption_all(scene: Scene, rng: np.random.Generator) -> str:
    long_form = rng.random() < 0.5
    order = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    listing = _join(_units(scene, order, rng, position_p=0.8 if long_form else 0.0))
    count = NUMBER_WORDS[len(scene.objects)]
    frame = _pick(rng, ["{l}", "a picture of {l}", "{n} shapes: {l}", "{n} objects: {l}", "an image with {l}"])
    return frame.format(l=listing, n=count)


def _caption_pair(scene: Scene, a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    true_relations = [p for p, holds in RELATIONS.items() if holds(a, b)]
    if true_relations and rng.random() < 0.6:
        first = _object_phrase(a, rng, colour_p=0.9, size_p=0.3)
        second = _object_phrase(b, rng, colour_p=0.9, size_p=0.3)
        return f"{first} {_pick(rng, true_relations)} {second}"
    listing = _join(_units(scene, [a, b], rng, position_p=0.4))
    return _pick(rng, ["{l}", "{l}", "a picture of {l}", "there are {l}"]).format(l=listing)


def _caption_single(obj: SceneObject, rng: np.random.Generator) -> str:
    phrase = _placed_phrase(obj, rng, position_p=0.6)
    return _pick(rng, ["{p}", "{p}", "there is {p}", "a picture of {p}", "an image with {p}"]).format(p=phrase)


def _subset_plan(n_objects: int, n_captions: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Which objects each caption mentions: all of them once, then distinct singletons and pairs
    (interleaved), cycling when a scene has fewer subsets than captions."""
    everything = tuple(range(n_objects))
    singles = [(i,) for i in range(n_objects)]
    pairs = [p for p in combinations(range(n_objects), 2) if p != everything]
    rng.shuffle(singles)
    rng.shuffle(pairs)
    interleaved = [s for pair in zip(singles, pairs) for s in pair] + singles[len(pairs):] + pairs[len(singles):]
    cycle = [everything] + interleaved
    return [cycle[k % len(cycle)] for k in range(n_captions)]


def describe(scene: Scene, rng: np.random.Generator, n_captions: int = 5) -> list[str]:
    """n_captions distinct captions, each mentioning a different subset of the objects where possible."""
    captions: list[str] = []
    for subset in _subset_plan(len(scene.objects), n_captions, rng):
        for _ in range(20):  # a different wording when a short form repeats an earlier caption
            if len(subset) == len(scene.objects):
                text = _caption_all(scene, rng)
            elif len(subset) == 2:
                text = _caption_pair(scene, scene.objects[subset[0]], scene.objects[subset[1]], rng)
            else:
                text = _caption_single(scene.objects[subset[0]], rng)
            text = text[0].upper() + text[1:]
            if text not in captions:
                break
        captions.append(text)
    return [captions[int(i)] for i in rng.permutation(len(captions))]


# ---------------------------------------------------------------- samples


def split_key(split: str) -> int:
    """A stable number per split name, part of each sample's random seed (Python's hash() is salted per
    process)."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # level 1: a third of the default level's time, and pictures this simple barely get smaller at 6
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def builtin_samples(split: str, count: int, seed: int, image_size: int) -> Iterator[RawSample]:
    """The split's first `count` samples. Sample k depends only on (seed, split, k), so a split's stream
    does not change with the other splits' sizes and a smaller count gives a prefix of a larger one."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count} for split {split!r}")
    key = split_key(split)
    for k in range(count):
        rng = np.random.default_rng([seed, key, k])
        scene = generate_scene(rng, image_size)
        captions = describe(scene, rng)
        yield RawSample(
            image_id=f"builtin-{split}-{k:07d}",
            image_bytes=encode_png(render(scene, image_size)),
            image_ext="png",
            captions=captions,
            # what is drawn, for plausible-match metrics whose ground truth is not the captions' words
            objects=[{"shape": o.shape, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col}
                     for o in scene.objects],
        )
