"""Captions -> PIL images in Python, from an exported model folder (local or any fsspec URL).

    from sdn_dist import Pipeline
    pipe = Pipeline.from_pretrained("runs/demo/export", device="cpu")   # or s3://bucket/runs/demo
    images = pipe(["a large red circle in the top left on a white background"], seed=0)
    images[0].save("circle.png")

`sdn-dist generate` is a thin CLI over this class. Captions are encoded with the text encoder the
run recorded (the same encoder, dimension and version the student was trained with); one caption
gives one image, in ``batch_size`` batches. A run trained with ``model.noise_dim > 0`` draws its
noise from a generator seeded with ``seed``: the same captions and seed give the same images, in
batches of any size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from sdn_dist.data.text import encoder_from_record
from sdn_dist.errors import UserError
from sdn_dist.training.export import load_student


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3,H,W] float in [0,1] -> an 8-bit RGB image (values clamped, rounded)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


@torch.no_grad()
def render(student, text: torch.Tensor, *, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """text [B,D] (+ noise [B,N], else drawn from ``generator``) -> images [B,3,S,S] in [0,1]
    (float32, on CPU)."""
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    text = text.to(device, dtype)
    if getattr(student, "noise_dim", 0):
        if noise is None:
            noise = torch.randn(text.shape[0], student.noise_dim, generator=generator)
        noise = noise.to(device, dtype)
    return student(text, noise)["image"].float().clamp(0, 1).cpu()


class Pipeline:
    """A trained student with its text encoder. Build it with :meth:`from_pretrained`."""

    def __init__(self, student, encoder, config: dict, source: str = ""):
        self.student, self.encoder, self.config, self.source = student, encoder, config, source

    @classmethod
    def from_pretrained(cls, path_or_url: str, device: str | torch.device | None = None) -> "Pipeline":
        """``path_or_url``: an export folder (``RUN/export``), its run directory, or an older
        ``student.pt``; a local path or any fsspec URL (``s3://``, ``https://``...). ``device``:
        default CUDA when available. UserError naming the file for an export that does not fit,
        or a run whose text encoder cannot encode free text (``text.encoder=precomputed``)."""
        dev = torch.device(device) if device is not None else default_device()
        student, config = load_student(str(path_or_url), device=dev)
        record = config.get("text")
        encoder = encoder_from_record(record)
        if getattr(encoder, "precomputed", False):
            raise UserError(
                f"{path_or_url} was trained with text.encoder=precomputed (embeddings stored in the "
                f"shards, e.g. CUB's char-CNN-RNN rows): there is no text model to encode new captions. "
                f"Use `sdn-dist eval` on shards that carry the embeddings, or train with "
                f"text.encoder=minilm (or hash) to generate from free text")
        return cls(student, encoder, config, str(path_or_url))

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def batches(self, captions: list[str], *, seed: int = 0, batch_size: int = 32) -> Iterator[torch.Tensor]:
        """Images [B,3,S,S] in [0,1], batch after batch, in caption order (``seed``: the noise
        input of a model with ``model.noise_dim > 0``, one row per caption)."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        # One noise row per caption, drawn one by one: a caption's image depends on the seed and
        # its place in the list only, not on the batch size or the list's length (torch draws a
        # block of >= 16 normals in another order than a short one).
        noise_dim = getattr(self.student, "noise_dim", 0)
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.stack([torch.randn(noise_dim, generator=gen) for _ in captions])
        for s in range(0, len(captions), batch_size):
            chunk = captions[s:s + batch_size]
            text = torch.from_numpy(np.asarray(self.encoder.encode(chunk), dtype=np.float32))
            yield render(self.student, text, noise=noise[s:s + batch_size])

    def __call__(self, captions: str | list[str], *, seed: int = 0, batch_size: int = 32) -> list[Image.Image]:
        """One PIL image per caption (a single string counts as one caption)."""
        captions = [captions] if isinstance(captions, str) else [str(c) for c in captions]
        if not captions:
            raise UserError("no captions to generate from")
        return [to_pil(img) for batch in self.batches(captions, seed=seed, batch_size=batch_size) for img in batch]
