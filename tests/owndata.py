"""Tiny data sets in the two layouts a user brings (the README's "Train on your own images"):

* an image folder + ``captions.jsonl`` with a ``label`` (what `shards convert folder` reads);
* img2dataset's webdataset output: ``00000.tar`` ... with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``
  (url, caption, status, sizes: no class label) and ``00000_stats.json`` beside each tar.

Images are small photos of nothing in particular: a coloured disc on a textured background, its
colour named in the caption, at a size that is not the model's (the readers resize).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}


def picture(colour: str, rng: random.Random, size: int = 48) -> Image.Image:
    bg = tuple(rng.randrange(120, 230) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for _ in range(20):   # some texture, so the images are not flat
        x, y = rng.randrange(size), rng.randrange(size)
        d.point((x, y), fill=tuple(rng.randrange(256) for _ in range(3)))
    r = rng.randrange(size // 5, size // 3)
    cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return im.filter(ImageFilter.SMOOTH)


def labelled_folder(root: Path, n: int = 36, seed: int = 0) -> Path:
    """root/photos/*.jpg|png + root/photos/captions.jsonl with string labels."""
    rng = random.Random(seed)
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        rel = f"sub/{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
        picture(colour, rng).save(photos / rel)
        lines.append({"image": rel, "captions": [f"a {colour} disc", f"a photo of a {colour} ball"],
                      "label": colour})
    (photos / "captions.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return photos


def img2dataset_folder(root: Path, shards: int = 4, per_shard: int = 12, seed: int = 1) -> Path:
    """root/00000.tar ... as img2dataset writes them (output_format=webdataset), caption only."""
    import webdataset as wds
    rng = random.Random(seed)
    out = root / "img2dataset-out"
    out.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as tw:
            for _ in range(per_shard):
                colour = rng.choice(list(COLOURS))
                buf = io.BytesIO()
                picture(colour, rng, size=rng.choice([40, 56, 72])).save(buf, "JPEG", quality=90)
                key = f"{s:05d}{k:04d}"
                caption = f"a {colour} disc on a wall"
                tw.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption,
                          "json": json.dumps({"url": f"https://example.invalid/{key}.jpg", "caption": caption,
                                              "key": key, "status": "success", "error_message": None,
                                              "width": 64, "height": 64}).encode()})
                k += 1
        (out / f"{s:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0}))
    return out
