"""The exported student: what `generate` and `eval` need, loadable without Ray or DeepSpeed.

``<out>/export/student.pt`` holds only tensors and plain data (loaded with ``weights_only=True``):
{"format": "sdn-dist-student/1", "state_dict", "model": ModelConfig, "text": encoder record,
 "step", "preset", "teacher": teacher weights URL}.
"""

from __future__ import annotations

import io

import torch

from sdn_dist import fsio
from sdn_dist.config import Config, ModelConfig
from sdn_dist.errors import UserError
from sdn_dist.model.student import Student

FORMAT = "sdn-dist-student/1"


def export_student(cfg: Config, state_dict: dict, text_spec: dict, step: int) -> str:
    blob = {"format": FORMAT, "state_dict": state_dict, "model": cfg.model.model_dump(mode="json"),
            "text": text_spec, "step": step, "preset": cfg.preset, "teacher": cfg.teacher.weights,
            "data": {"train": cfg.data.train, "test": cfg.data.test}}
    buf = io.BytesIO()
    torch.save(blob, buf)
    url = fsio.join(cfg.out, "export", "student.pt")
    fsio.atomic_write(url, buf.getvalue())
    return url


def resolve(checkpoint: str) -> str:
    """A run directory or an exported file -> the exported file's URL."""
    if checkpoint.endswith(".pt"):
        return checkpoint
    return fsio.join(checkpoint, "export", "student.pt")


def load_student(checkpoint: str, device="cpu"):
    """-> (Student in eval mode, blob). Names the file in every error."""
    url = resolve(checkpoint)
    if not fsio.exists(url):
        raise UserError(f"no exported student at {url} (is the run finished? `sdn-dist train` writes it at the end)")
    blob = fsio.load_torch(url, "exported student", map_location=device)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{url} is not an sdn-dist exported student (format {FORMAT})")
    model_cfg = ModelConfig.model_validate(blob["model"])
    student = Student(model_cfg, int(blob["text"]["dim"]))
    try:
        student.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{url}: weights do not match the recorded model: {str(e).splitlines()[0]}") from None
    return student.to(device).eval(), blob
