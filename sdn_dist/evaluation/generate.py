"""Captions -> PNGs with a trained student.

    sdn-dist generate --checkpoint runs/demo --text "a large red circle in the top left on a white background" --out gen/
    from sdn_dist.evaluation.generate import generate
    paths = generate("runs/demo", ["a small blue square ..."], "gen/", batch_size=32)

``checkpoint`` is a run directory (its ``export/student.pt`` is used) or an exported ``.pt``
file, any fsspec URL. Captions are encoded with the text encoder the run recorded (hash, MiniLM):
the same encoder, dimension and version the student was trained with. One caption gives one
image (no noise input, as in the reference; a run trained with ``model.noise_dim > 0`` gets noise
drawn from a generator seeded with ``seed``, so reruns are identical). Files are written as
``NNNN-<slug>.png`` in caption order: NNNN the zero-padded index (4 digits, more when there are
more than 10,000 captions), slug the caption lower-cased, runs of anything but a-z / 0-9 turned
into one hyphen, cut to 60 characters.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdn_dist import fsio
from sdn_dist.data.text import encoder_from_record
from sdn_dist.errors import UserError
from sdn_dist.training.export import load_student

SLUG_MAX = 60


def slugify(caption: str, max_len: int = SLUG_MAX) -> str:
    """'A big, RED circle!' -> 'a-big-red-circle' (never empty: 'caption')."""
    slug = re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "caption"


def file_names(captions: list[str]) -> list[str]:
    width = max(4, len(str(max(len(captions) - 1, 0))))
    return [f"{i:0{width}d}-{slugify(c)}.png" for i, c in enumerate(captions)]


def to_png(image: torch.Tensor) -> bytes:
    """[3,H,W] float in [0,1] -> PNG bytes (values clamped, rounded to 8 bits)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, "PNG")
    return buf.getvalue()


def text_encoder_for(blob: dict, checkpoint: str):
    """The encoder the run recorded; UserError if it cannot encode free text."""
    record = blob.get("text")
    if not isinstance(record, dict):
        raise UserError(f"{checkpoint}: the exported student records no text encoder")
    encoder = encoder_from_record(record)
    if getattr(encoder, "precomputed", False):
        raise UserError(
            f"{checkpoint} was trained with text.encoder=precomputed (embeddings stored in the "
            f"shards, e.g. CUB's char-CNN-RNN rows): there is no text model to encode new captions. "
            f"Use `sdn-dist eval` on shards that carry the embeddings, or train with "
            f"text.encoder=minilm (or hash) to generate from free text")
    return encoder


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def render(student, text: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """text [B,D] -> images [B,3,S,S] in [0,1] (float32, on CPU)."""
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    text = text.to(device, dtype)
    noise = None
    if getattr(student, "noise_dim", 0):
        noise = torch.randn(text.shape[0], student.noise_dim, generator=generator).to(device, dtype)
    return student(text, noise)["image"].float().clamp(0, 1).cpu()


def generate(checkpoint: str, captions: list[str], out: str, batch_size: int = 32, *,
             seed: int = 0, device: str | torch.device | None = None, progress: bool = False) -> list[str]:
    """Write one PNG per caption to ``out`` (created; any fsspec URL). Returns the file URLs in
    caption order. UserError (exit 2) for a missing/unreadable checkpoint, no captions, a bad
    batch size, or a run whose text encoder cannot encode free text."""
    captions = [str(c) for c in captions]
    if not captions:
        raise UserError("no captions to generate from")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    fs, path = fsio.url_to_fs(out)
    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"--out {out} is an existing file; give a directory for the PNGs")
    dev = torch.device(device) if device is not None else default_device()
    student, blob = load_student(checkpoint, device=dev)
    encoder = text_encoder_for(blob, checkpoint)
    fsio.makedirs(out)
    names = file_names(captions)
    gen = torch.Generator().manual_seed(int(seed))
    paths: list[str] = []
    for s in tqdm(range(0, len(captions), batch_size), desc="generate", unit="batch",
                  disable=not progress):
        chunk = captions[s:s + batch_size]
        text = torch.from_numpy(np.asarray(encoder.encode(chunk), dtype=np.float32))
        images = render(student, text, generator=gen)
        for i, img in enumerate(images):
            url = fsio.join(out, names[s + i])
            fsio.atomic_write(url, to_png(img))
            paths.append(url)
    return paths
