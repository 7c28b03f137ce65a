"""PNG grids of generated vs real images, written to ``<out>/samples/`` during training.

Row 1: images generated from fixed test captions; row 2: the real images those captions describe.
The captions go beside the grid as ``step-NNNNNNNN.json``. Each written grid is also announced as a
``{"event": "samples", "url": ...}`` record through ``report`` (the record collector), so the driver's
metrics sink can show it in TensorBoard without watching the folder.
"""

from __future__ import annotations

import io
import json

import torch
from torchvision.utils import make_grid, save_image

from sdn_dist import fsio
from sdn_dist.config import DataConfig, SamplesConfig
from sdn_dist.data.pipeline import iter_batches
from sdn_dist.data.shards import expand_urls
from sdn_dist.data.text import encoder_from_record


def grid_png(generated: torch.Tensor, real: torch.Tensor | None = None) -> bytes:
    """[N,3,S,S] in [0,1] (and the paired reals) -> PNG bytes; generated on top, real below."""
    rows = [generated.clamp(0, 1)] + ([real.clamp(0, 1)] if real is not None else [])
    grid = make_grid(torch.cat(rows), nrow=generated.shape[0], padding=2, pad_value=1.0)
    buf = io.BytesIO()
    save_image(grid, buf, format="png")
    return buf.getvalue()


class SampleGrid:
    """Rank 0's sample grids. Under ZeRO-3 every rank builds one and calls :meth:`write` at the
    same steps: the student's forward gathers its partitioned weights from every rank (a
    collective), so a rank-0-only forward would wait forever; only rank 0 writes the files."""

    def __init__(self, out: str, data: DataConfig, samples: SamplesConfig, image_size: int, seed: int,
                 text_spec: dict, device, report=None, rank: int = 0):
        """``out``: the run directory; ``data`` / ``samples``: those config sections (the grid shows
        ``samples.count`` captions of the test data, else of the training data)."""
        self.rank = rank
        self.out = fsio.join(out, "samples")
        self.device = device
        self.report = report   # records -> the driver (RecordCollector.report.remote), or None
        urls = (expand_urls(data.test, split="test") if data.test
                else expand_urls(data.train, split="train"))
        encoder = encoder_from_record(text_spec)
        batch = next(iter(iter_batches(urls, image_size=image_size, batch_size=samples.count,
                                       text_encoder=encoder, shuffle=False, seed=seed, epochs=1,
                                       caption="first")))
        self.real = batch["image"]
        self.text = torch.as_tensor(batch["text"]).float()
        self.captions = batch["captions"]

    @torch.no_grad()
    def write(self, student, step: int, stage: int) -> str:
        was_training = student.training
        student.eval()
        dtype = next(student.parameters()).dtype
        gen = student(self.text.to(self.device, dtype))["image"].float().cpu()
        student.train(was_training)
        if self.rank != 0:
            return ""
        url = fsio.join(self.out, f"step-{step:08d}.png")
        fsio.atomic_write(url, grid_png(gen, self.real))
        fsio.atomic_write(url[:-4] + ".json", json.dumps({"step": step, "stage": stage, "captions": self.captions}))
        if self.report is not None:
            # lazy: the collector module imports Ray (~0.3 s), which `sdn-dist eval` (grid_png) never needs
            from sdn_dist.training.collector import event
            self.report([event("samples", step=step, stage=stage, rank=0, url=url)])
        return url
