"""Captions -> PNGs with a trained student.

    sdn-dist generate --checkpoint runs/demo --text "a large red circle in the top left on a white background" --out gen/
    from sdn_dist.evaluation.generate import generate
    paths = generate("runs/demo/export", ["a small blue square ..."], "gen/", batch_size=32)

A thin CLI layer over :class:`sdn_dist.Pipeline` (see sdn_dist/pipeline.py): ``checkpoint`` is
an export folder (``RUN/export``: model.safetensors + config.json), its run directory, or a
older ``student.pt``; any fsspec URL. One caption gives one image (no noise input, as in the
reference; a run trained with ``model.noise_dim > 0`` gets noise drawn from a generator seeded
with ``seed``, so reruns are identical). Files are written as
``NNNN-<slug>.png`` in caption order: NNNN the zero-padded index (4 digits, more when there are
more than 10,000 captions), slug the caption lower-cased, runs of anything but a-z / 0-9 turned
into one hyphen, cut to 60 characters.
"""

from __future__ import annotations

import io
import re

import torch
from PIL import Image
from tqdm import tqdm

from sdn_dist import fsio
from sdn_dist.errors import UserError
from sdn_dist.pipeline import Pipeline, to_pil

SLUG_MAX = 60


def slugify(caption: str, max_len: int = SLUG_MAX) -> str:
    """'A big, RED circle!' -> 'a-big-red-circle' (never empty: 'caption')."""
    slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "caption"


def file_names(captions: list[str]) -> list[str]:
    width = max(4, len(str(max(len(captions) - 1, 0))))
    return [f"{i:0{width}d}-{slugify(c)}.png" for i, c in enumerate(captions)]


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def generate(checkpoint: str, captions: list[str], out: str, batch_size: int = 32, *,
             seed: int = 0, device: str | torch.device | None = None, progress: bool = False) -> list[str]:
    """Write one PNG per caption to ``out`` (created; any fsspec URL): the images of
    :class:`sdn_dist.Pipeline` for the same captions and seed. Returns the file URLs
    in caption order. UserError (exit 2) for a missing/unreadable export, no captions, an empty
    or whitespace-only caption, a bad
    batch size, or a run whose text encoder cannot encode free text."""
    captions = [str(c) for c in captions]
    if not captions:
        raise UserError("no captions to generate from")
    empty = next((i for i, c in enumerate(captions) if not c.strip()), None)
    if empty is not None:
        raise UserError(f"caption {empty} (counting from 0) is empty ({captions[empty]!r}); give the text to draw")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    fs, path = fsio.url_to_fs(out)
    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"--out {out} is an existing file; give a directory for the PNGs")
    pipe = Pipeline.from_pretrained(checkpoint, device=device)
    fsio.makedirs(out)
    names = file_names(captions)
    paths: list[str] = []
    batches = pipe.batches(captions, seed=seed, batch_size=batch_size)
    for images in tqdm(batches, total=-(-len(captions) // batch_size), desc="generate", unit="batch",
                       disable=not progress):
        for img in images:
            url = fsio.join(out, names[len(paths)])
            fsio.atomic_write(url, to_png(to_pil(img)))
            paths.append(url)
    return paths
