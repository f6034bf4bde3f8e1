"""The built-in procedural corpus: determinism, pictures that match their scenes, truthful captions."""
from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shards.builtin_corpus import (
    COLOURS,
    SHAPES,
    SIZE_RADIUS,
    Scene,
    SceneObject,
    builtin_samples,
    describe,
    generate_scene,
    render,
    split_key,
)

# The test's own reading of the caption language: every word a caption may use, and what it means.
SHAPE_OF_WORD = {
    "circle": "circle", "disc": "circle", "square": "square", "box": "square", "triangle": "triangle",
    "star": "star", "cross": "cross", "heart": "heart", "diamond": "diamond", "rhombus": "diamond",
    "ring": "ring", "donut": "ring",
}
PLURAL = {w: (w + "es" if w.endswith(("x", "s")) else w + "s") for w in SHAPE_OF_WORD}
SIZE_OF_WORD = {"small": "small", "little": "small", "large": "large", "big": "large"}
NUMBERS = {"two": 2, "three": 3, "four": 4}
POSITIONS = [
    "in the top left corner", "in the top right corner", "in the bottom left corner", "in the bottom right corner",
    "at the top left", "at the top right", "at the bottom left", "at the bottom right",
    "on the left side", "on the right side", "on the left", "on the right", "at the top", "near the top",
    "at the bottom", "near the bottom", "in the centre", "in the middle",
]
RELATION_HOLDS = {
    "to the left of": lambda a, b: a.col < b.col,
    "to the right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
    "next to": lambda a, b: max(abs(a.row - b.row), abs(a.col - b.col)) == 1,
}


def position_holds(phrase: str, obj: SceneObject) -> bool:
    words = set(phrase.split())
    checks = [
        ("left" not in words or obj.col == 0),
        ("right" not in words or obj.col == 2),
        ("top" not in words or obj.row == 0),
        ("bottom" not in words or obj.row == 2),
        (not words & {"centre", "middle"} or (obj.row, obj.col) == (1, 1)),
    ]
    return all(checks)


def _alternatives(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


SHAPE_OF_PLURAL = {PLURAL[w]: shape for w, shape in SHAPE_OF_WORD.items()}
NOUNS = list(SHAPE_OF_WORD) + list(SHAPE_OF_PLURAL)
UNIT = re.compile(
    rf"(?P<det>a|an|two|three|four) (?:(?P<size>{_alternatives(SIZE_OF_WORD)}) )?"
    rf"(?:(?P<colour>{_alternatives(COLOURS)}) )?(?P<noun>{_alternatives(NOUNS)})"
    rf"(?: (?P<position>{_alternatives(POSITIONS)}))?(?=,| |$)")
SEPARATOR = re.compile(rf"(, | and | (?:{_alternatives(RELATION_HOLDS)}) )")
FRAME = re.compile(r"(?:there is |there are |a picture of |an image with |(?P<n>two|three|four) (?:shapes|objects): )?")


def check_caption(caption: str, scene: Scene) -> int:
    """Parses the whole caption (no word may be left over) and checks every claim against the scene.
    Returns how many objects the caption mentions."""
    assert caption[0].isupper(), caption
    text = caption.lower()
    frame = FRAME.match(text)
    if frame.group("n"):
        assert NUMBERS[frame.group("n")] == len(scene.objects), caption
    pos, units, relations = frame.end(), [], []
    while True:
        unit = UNIT.match(text, pos)
        assert unit, f"cannot read {caption!r} at {text[pos:]!r}"
        units.append(unit)
        pos = unit.end()
        if pos == len(text):
            break
        separator = SEPARATOR.match(text, pos)
        assert separator, f"unexpected words in {caption!r} at {text[pos:]!r}"
        relations.append(separator.group(1).strip(" ,"))
        pos = separator.end()

    matches = []
    mentioned = 0
    for unit in units:
        det, noun, size, colour = unit["det"], unit["noun"], unit["size"], unit["colour"]
        plural = noun not in SHAPE_OF_WORD
        shape = SHAPE_OF_PLURAL[noun] if plural else SHAPE_OF_WORD[noun]
        found = [o for o in scene.objects if o.shape == shape and (colour is None or o.colour == colour)
                 and (size is None or o.size == SIZE_OF_WORD[size])]
        if det in ("a", "an"):
            assert not plural, caption
            assert (det == "an") == (text[unit.start() + len(det) + 1] in "aeiou"), caption
            assert found, f"{caption!r}: no {unit.group(0)!r} in the scene"
            mentioned += 1
        else:
            assert plural, caption
            assert len(found) == NUMBERS[det], f"{caption!r}: the scene has {len(found)} of {unit.group(0)!r}"
            mentioned += NUMBERS[det]
        if unit["position"]:
            assert any(position_holds(unit["position"], o) for o in found), f"{caption!r}: wrong position"
        matches.append(found)
    for i, relation in enumerate(relations):
        if relation in RELATION_HOLDS:
            assert any(RELATION_HOLDS[relation](a, b) for a in matches[i] for b in matches[i + 1]), caption
    return mentioned


@pytest.fixture(scope="module")
def corpus() -> list[tuple[Scene, list[str]]]:
    out = []
    for k in range(300):
        rng = np.random.default_rng([7, k])
        scene = generate_scene(rng, 64)
        out.append((scene, describe(scene, rng)))
    return out


def test_samples_are_deterministic_and_independent_of_other_streams():
    first = list(builtin_samples("train", 6, seed=3, image_size=64))
    again = list(builtin_samples("train", 6, seed=3, image_size=64))
    assert [(s.image_id, s.image_bytes, s.captions) for s in first] == \
           [(s.image_id, s.image_bytes, s.captions) for s in again]
    # a smaller count is a prefix of a larger one
    prefix = list(builtin_samples("train", 3, seed=3, image_size=64))
    assert [s.image_bytes for s in prefix] == [s.image_bytes for s in first[:3]]
    assert [s.image_id for s in first] == [f"builtin-train-{k:07d}" for k in range(6)]
    assert all("." not in s.image_id and s.image_ext == "png" for s in first)
    # other seeds and other splits draw other pictures
    other_seed = list(builtin_samples("train", 6, seed=4, image_size=64))
    val = list(builtin_samples("val", 6, seed=3, image_size=64))
    assert not {s.image_bytes for s in first} & {s.image_bytes for s in other_seed}
    assert not {s.image_bytes for s in first} & {s.image_bytes for s in val}


def test_samples_carry_the_drawn_objects():
    rng = np.random.default_rng([3, split_key("train"), 0])
    scene = generate_scene(rng, 64)
    (sample,) = builtin_samples("train", 1, seed=3, image_size=64)
    assert sample.objects == [{"shape": o.shape, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col}
                              for o in scene.objects]
    assert 2 <= len(sample.objects) <= 4


def test_image_size_option():
    (sample,) = builtin_samples("test", 1, seed=0, image_size=96)
    image = Image.open(io.BytesIO(sample.image_bytes))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (96, 96)
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match="seed"):
        next(builtin_samples("train", 1, seed=-1, image_size=64))


def test_scenes_have_two_to_four_separate_objects(corpus):
    counts = Counter(len(scene.objects) for scene, _ in corpus)
    assert set(counts) == {2, 3, 4}
    for scene, _ in corpus:
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        for o in scene.objects:
            assert o.radius <= o.cx <= 64 - o.radius and o.radius <= o.cy <= 64 - o.radius
            assert int(o.cx // (64 / 3)) == o.col and int(o.cy // (64 / 3)) == o.row
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > 1.1 * (a.radius + b.radius)
    all_objects = [o for scene, _ in corpus for o in scene.objects]
    assert {o.shape for o in all_objects} == set(SHAPES)
    assert {o.colour for o in all_objects} == set(COLOURS)
    assert {o.size for o in all_objects} == {"small", "large"}


def test_render_draws_each_object_where_the_scene_says(corpus):
    for scene, _ in corpus[:60]:
        pixels = np.asarray(render(scene, 64)).astype(int)
        for o in scene.objects:
            # a ring is hollow: look on its band instead of its centre
            x = o.cx + (0.78 * o.radius if o.shape == "ring" else 0.0)
            colour = pixels[int(o.cy), int(x)]
            assert np.abs(colour - COLOURS[o.colour]).max() < 40, (o, colour)
        occupied = {(o.row, o.col) for o in scene.objects}
        for cell in set(np.ndindex(3, 3)) - occupied:
            centre = pixels[int((cell[0] + 0.5) * 64 / 3), int((cell[1] + 0.5) * 64 / 3)]
            assert np.abs(centre - scene.background).max() < 25


def test_shapes_can_be_told_apart():
    def mask(shape: str, size: str) -> np.ndarray:
        r = SIZE_RADIUS[size] * 64 / 3
        scene = Scene(64, (228, 228, 228), "plain", 0, (SceneObject(shape, "black", size, 1, 1, 32.0, 32.0, r),))
        return np.abs(np.asarray(render(scene, 64)).astype(int) - 228).sum(-1) > 120

    for size in ("small", "large"):
        masks = {shape: mask(shape, size) for shape in SHAPES}
        assert all(m.sum() >= 30 for m in masks.values()), size
        for i, a in enumerate(SHAPES):
            for b in SHAPES[i + 1:]:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.8, (a, b, size, iou)


def test_captions_are_true_and_mention_different_subsets(corpus):
    words_seen: Counter[str] = Counter()
    for scene, captions in corpus:
        assert len(captions) == 5 and len(set(captions)) == 5
        mentioned = [check_caption(c, scene) for c in captions]
        # one caption names every object; others name fewer
        assert len(scene.objects) in mentioned and min(mentioned) < len(scene.objects), (captions, scene)
        words_seen.update(w for c in captions for w in c.lower().replace(",", " ").replace(":", " ").split())
    # the language is actually used: synonyms, sizes, counts, positions and relations all occur
    for word in ("disc", "box", "rhombus", "donut", "little", "big", "two", "three", "corner", "centre", "left",
                 "above", "below", "next", "shapes", "objects"):
        assert words_seen[word] > 0, word


def test_captions_are_shared_across_images(corpus):
    per_image = [captions for _, captions in corpus]
    images_of_caption: Counter[str] = Counter(c for caps in per_image for c in set(caps))
    assert max(images_of_caption.values()) >= 3  # a short caption fits several pictures
    assert len(images_of_caption) < sum(len(caps) for caps in per_image)
    # a concept (a shape noun) is named in the captions of many images
    images_naming = Counter(w for caps in per_image
                            for w in {w for c in caps for w in c.lower().split() if w in SHAPE_OF_WORD})
    assert min(images_naming[w] for w in ("circle", "star", "heart")) >= 10
