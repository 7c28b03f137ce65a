"""The built-in synthetic text-to-image benchmark: coloured shapes with attributes and captions.

    sdn-dist shards synth --out shards/synth --train 4000 --test 800 --size 64 --seed 0
    from sdn_dist.apps.synth.dataset import make_synth, synth_sample, VOCAB, HELDOUT_PAIRS

Every image shows one object; its attributes are drawn from a small vocabulary (learnable on a
CPU in minutes) and every one of them is recorded in ``KEY.json`` (``meta["attributes"]``):

    shape       circle, square, triangle, cross
    colour      red, green, blue, yellow, purple, orange
    size        large (bounding box ~0.66 of the side), small (~0.50), scaled per shape
    position    top left, top right, bottom left, bottom right
    background  white, black, grey

4 x 6 x 2 x 4 x 3 = 576 combinations. Objects cover about 15-37 % of the image (meta["area"]),
large enough that a pixel loss cannot settle for the plain background.

Held-out rule (fixed): shape number i (in the order above) is never shown in training in colour
number i + 2: circle-blue, square-yellow, triangle-purple, cross-orange. Those 4 pairs, in every
size, position and background (96 combinations), occur only in the test split. The test split
separates the two kinds of novelty, by index modulo 4 (meta["split_kind"]):

    0, 2  "heldout"     a held-out combination, training caption templates (only the composition
                        is new: compositional generalisation); half the test split
    1     "seen"        a combination seen in training, training caption templates (a new image
                        of a known kind: the plain test)
    3     "paraphrase"  a combination seen in training, described by test-only caption templates
                        whose wording never occurs in training (only the wording is new)

Deterministic: sample i of a split depends only on (seed, split, i), so the same seed gives
byte-identical shards.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from sdn_dist.errors import DataError
from sdn_dist.data.writer import shard_writer

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
           "yellow": (240, 205, 40), "purple": (150, 60, 200), "orange": (245, 135, 30)}
SIZES = {"large": 0.66, "small": 0.50}  # bounding-box side / image side (before the shape scale)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "grey": (128, 128, 128)}

VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
    "position": POSITIONS, "background": tuple(BACKGROUNDS),
}
ATTRIBUTES = tuple(VOCAB)
HELDOUT_PAIRS = frozenset((s, VOCAB["colour"][i + 2]) for i, s in enumerate(SHAPES))
CAPTIONS_PER_IMAGE = 4
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # of the bbox
# Per-shape scale of the bounding box so that every shape of a size covers a similar area.
_SHAPE_SCALE = {"circle": 1.0, "square": 0.9, "triangle": 1.15, "cross": 1.1}
_SUPERSAMPLE = 4

SYNONYMS = {
    "circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
    "cross": ["cross", "plus sign"],
    "red": ["red"], "green": ["green"], "blue": ["blue"], "yellow": ["yellow"],
    "purple": ["purple", "violet"], "orange": ["orange"],
    "large": ["large", "big"], "small": ["small", "little"],
    "top left": ["top left", "upper left"], "top right": ["top right", "upper right"],
    "bottom left": ["bottom left", "lower left"], "bottom right": ["bottom right", "lower right"],
    "white": ["white", "light"], "black": ["black", "dark"], "grey": ["grey", "gray"],
}

TRAIN_TEMPLATES = (
    "a {size} {colour} {shape} in the {pos} on a {bg} background",
    "{size} {colour} {shape}, {pos} corner, {bg} background",
    "there is a {colour} {shape} at the {pos}. it is {size}. the background is {bg}.",
    "a {bg} background with a {size} {colour} {shape} in the {pos} corner",
    "the {shape} is {colour} and {size}, placed at the {pos} of a {bg} image",
    "{colour} {shape}, {size}, {pos}, on {bg}",
    "an image of a {size} {shape} coloured {colour} in the {pos} corner against a {bg} background",
    "a {size} {shape} in {colour} sits in the {pos} on {bg}",
)
# Their distinctive words ("backdrop", "quadrant", "region", ...) never occur in training captions.
TEST_TEMPLATES = (
    "on a {bg} backdrop one can see a {colour} {shape} toward the {pos}; it looks {size}",
    "picture: {size} {colour} {shape} near the {pos} edge with {bg} behind it",
    "somewhere in the {pos} region lies a {shape}, {colour}, rather {size}, over {bg}",
    "a single {size} {colour} {shape} located in the {pos} quadrant of a {bg} scene",
    "look at the {pos} quadrant: a {size} {shape} painted {colour} on plain {bg}",
)

ALL_COMBOS = list(itertools.product(*VOCAB.values()))
SEEN_COMBOS = [c for c in ALL_COMBOS if (c[0], c[1]) not in HELDOUT_PAIRS]
HELDOUT_COMBOS = [c for c in ALL_COMBOS if (c[0], c[1]) in HELDOUT_PAIRS]


def is_heldout(attributes: dict) -> bool:
    """Whether a combination is one the training split never shows."""
    return (attributes["shape"], attributes["colour"]) in HELDOUT_PAIRS


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, {"train": 1, "test": 2}[split], index])


def _caption(template: str, attrs: dict, rng: np.random.Generator) -> str:
    def syn(v):
        opts = SYNONYMS[v]
        return opts[int(rng.integers(len(opts)))]

    text = template.format(shape=syn(attrs["shape"]), colour=syn(attrs["colour"]),
                           size=syn(attrs["size"]), pos=syn(attrs["position"]),
                           bg=syn(attrs["background"]))
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def _draw(attrs: dict, size: int, rng: np.random.Generator) -> tuple[Image.Image, list[float], float]:
    """Antialiased drawing (4x supersampled, then a Lanczos reduction). Returns the image, the
    normalised bounding box and the object's area fraction."""
    nominal = SIZES[attrs["size"]] * _SHAPE_SCALE[attrs["shape"]]
    side = nominal * float(rng.uniform(0.96, 1.04))
    d = 0.5 - nominal * 1.04 / 2 - 0.02  # corner offset that keeps the object inside with jitter
    row, col = attrs["position"].split()
    cx = 0.5 + (d if col == "right" else -d) + float(rng.uniform(-0.015, 0.015))
    cy = 0.5 + (d if row == "bottom" else -d) + float(rng.uniform(-0.015, 0.015))
    colour = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[attrs["colour"]])
    bg = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in BACKGROUNDS[attrs["background"]])

    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), bg)
    dr = ImageDraw.Draw(img)
    x0, y0, x1, y1 = ((cx - side / 2) * big, (cy - side / 2) * big,
                      (cx + side / 2) * big, (cy + side / 2) * big)
    shape = attrs["shape"]
    if shape == "circle":
        dr.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        dr.rectangle([x0, y0, x1, y1], fill=colour)
    elif shape == "triangle":
        dr.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross: two bars a third of the side wide
        w = (x1 - x0) / 3
        dr.rectangle([x0, (y0 + y1) / 2 - w / 2, x1, (y0 + y1) / 2 + w / 2], fill=colour)
        dr.rectangle([(x0 + x1) / 2 - w / 2, y0, (x0 + x1) / 2 + w / 2, y1], fill=colour)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    bbox = [round(v, 4) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
    return img, bbox, round(_AREA[shape] * side * side, 4)


def synth_sample(split: str, index: int, *, size: int = 64, seed: int = 0) -> dict:
    """Sample ``index`` of ``split`` ("train" | "test"): {"key", "image" (PIL), "png" (bytes),
    "captions", "meta"}. Pure: the same arguments give the same sample."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = _rng(seed, split, index)
    if split == "train":
        combos, templates, kind = SEEN_COMBOS, TRAIN_TEMPLATES, None
    elif index % 2 == 0:
        combos, templates, kind = HELDOUT_COMBOS, TRAIN_TEMPLATES, "heldout"
    elif index % 4 == 1:
        combos, templates, kind = SEEN_COMBOS, TRAIN_TEMPLATES, "seen"
    else:
        combos, templates, kind = SEEN_COMBOS, TEST_TEMPLATES, "paraphrase"
    combo = combos[int(rng.integers(len(combos)))]
    attrs = dict(zip(ATTRIBUTES, combo))
    chosen = rng.permutation(len(templates))[:CAPTIONS_PER_IMAGE]
    captions = [_caption(templates[t], attrs, rng) for t in chosen]
    img, bbox, area = _draw(attrs, size, rng)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    ids = {a: VOCAB[a].index(attrs[a]) for a in ATTRIBUTES}
    meta = {
        "source": "synth", "split": split, "index": index, "seed": seed,
        "attributes": attrs, "attribute_ids": ids,
        # label: the (shape, colour) class, shape_id * 6 + colour_id; 24 classes.
        "label": ids["shape"] * len(COLOURS) + ids["colour"],
        "bbox": bbox, "area": area,
        "templates": [("test" if templates is TEST_TEMPLATES else "train") + f"{int(t)}" for t in chosen],
    }
    if kind is not None:
        meta["split_kind"] = kind
    return {"key": f"{split}{index:07d}", "image": img, "png": buf.getvalue(),
            "captions": captions, "meta": meta}


def describe() -> dict:
    """The benchmark's vocabulary and held-out rule (written to ``DIR/synth.json``)."""
    return {
        "vocabulary": {k: list(v) for k, v in VOCAB.items()},
        "heldout_pairs": sorted([list(p) for p in HELDOUT_PAIRS]),
        "heldout_rule": "shape i never appears in training in colour i+2 (circle-blue, "
                        "square-yellow, triangle-purple, cross-orange); test: even index = "
                        "held-out combination (training templates), index % 4 == 1: seen combination "
                        "(training templates), index % 4 == 3: seen combination with test-only "
                        "templates (paraphrase)",
        "label": "shape_id * 6 + colour_id",
        "captions_per_image": CAPTIONS_PER_IMAGE,
    }


def make_synth(out: str, *, train: int = 4000, test: int = 800, size: int = 64,
               per_shard: int = 500, seed: int = 0, progress: bool = True, embed=None) -> dict:
    """Write ``out/train-000000.tar ...`` and ``out/test-000000.tar ...`` (+ ``out/synth.json``).

    ``embed``: optional TextEncoder; its caption embeddings are stored as ``KEY.emb.npy`` with
    ``meta["emb_encoder"]``, and a reader using the same encoder takes them instead of encoding
    (MiniLM on one CPU thread encodes ~200 captions/s: worth paying once, not every epoch).
    Returns ``{"train": [urls], "test": [urls], "counts": {"train": n, "test": m}}``."""
    if train < 0 or test < 0:
        raise DataError(f"--train and --test must be >= 0 (got {train}, {test})")
    if size < 8:
        raise DataError(f"--size must be >= 8 pixels, got {size}")
    result: dict = {"counts": {}}
    for split, n in (("train", train), ("test", test)):
        with shard_writer(out, split, per_shard, embed=embed) as sink:
            for i in tqdm(range(n), desc=f"synth {split}", unit="img", disable=not progress or n == 0):
                s = synth_sample(split, i, size=size, seed=seed)
                sink.add(s["key"], s["png"], "png", s["captions"], s["meta"])
        result[split], result["counts"][split] = sink.urls, sink.count
    info = {**describe(), "size": size, "seed": seed, "counts": result["counts"]}
    if "://" not in out or out.startswith("file://"):
        path = out.split("://", 1)[-1]
        with open(os.path.join(path, "synth.json"), "w") as f:
            json.dump(info, f, indent=1)
    return result


write_synth = make_synth  # the name the CLI uses
