"""Where FSIM is lost on the synthetic benchmark: its ceiling, and a run's images taken apart.

    python benchmarks/fsim_probe.py --shards 'runs/demo-pipeline/shards/test-*.tar'
    python benchmarks/fsim_probe.py --shards '...test-*.tar' --run runs/demo-pipeline/run

For the seen test captions (docs/history.md, "What we tried, round 8"). Without --run: the
ceiling a generator drawing from the caption alone could reach, FSIM (piq, as `sdn-dist eval`)
against the real test image of

* ``redraw``: another real drawing of the same attributes (the benchmark's own jitter: +-1 px of
  position, +-4 % of size, +-12 of object and +-8 of background colour, drawn again);
* ``nominal``: the drawing at the middle of every jitter range (what a perfect deterministic
  student of the caption would draw).

With --run, the run's exported student's images for the same captions, and

* ``object_from_real``: the generated image with the region within 2 px of the object's bounding
  box copied from the real one (what the object costs);
* ``background_from_real``: the rest copied instead (what the background costs);
* ``flat_noise``: mean |vertical neighbour difference| (the largest of the three channels') where
  the real image is flat (< 0.02);
* ``soft_edge``: of the pixels near the box that are part object (alpha > 0.1, alpha the pixel's
  share of the object's colour over the background's), the share that is only partly so
  (0.1 < alpha < 0.9): real images have only their antialiased rim there;
* ``two_colour``: the generated image redrawn in two colours, its background's (the corners'
  median) and its object's (the median at the box's centre), the object where a pixel near the
  box is more than half the object's colour: the same outlines with hard edges and no noise;
* ``centroid_px``: distance between the alpha-weighted centres of the generated and the real object,
  per shape, in pixels.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import piq
import torch
from torchvision.transforms.functional import to_tensor

from sdn_dist.data.pipeline import expand_urls, iter_batches
from sdn_dist.apps.synth.dataset import _draw
from sdn_dist.data.text import encoder_from_record
from sdn_dist.pipeline import render
from sdn_dist.training.export import load_student


class _Middle:
    """An rng that returns the middle of every range: the drawing without jitter."""

    def uniform(self, a, b):
        return (a + b) / 2

    def integers(self, a, b):
        return (a + b - 1) // 2


def _fsim(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(piq.fsim(a.clamp(0, 1), b, data_range=1.0, reduction="mean"))


def _object_mask(bbox, size: int, margin: int) -> torch.Tensor:
    x0, y0, x1, y1 = (int(round(v * size)) for v in bbox)
    m = torch.zeros(size, size, dtype=torch.bool)
    m[max(0, y0 - margin):min(size, y1 + margin), max(0, x0 - margin):min(size, x1 + margin)] = True
    return m


def _alpha(img: torch.Tensor, bg: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    d = (obj - bg).view(3, 1, 1)
    return (((img - bg.view(3, 1, 1)) * d).sum(0) / d.pow(2).sum().clamp_min(1e-6)).clamp(0, 1)


def _corner_colour(img: torch.Tensor) -> torch.Tensor:
    """The background's colour: the median of the image's four 2x2 corners."""
    corners = torch.stack([img[:, :2, :2], img[:, :2, -2:], img[:, -2:, :2], img[:, -2:, -2:]])
    return corners.permute(1, 0, 2, 3).reshape(3, -1).median(1).values


def _box_centre(bbox, size: int) -> tuple[int, int]:
    """The pixel (y, x) at the centre of a normalised bounding box."""
    return int((bbox[1] + bbox[3]) / 2 * size), int((bbox[0] + bbox[2]) / 2 * size)


def _geometry(img: torch.Tensor, real: torch.Tensor, bbox, size: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """(soft-edge share, alpha-weighted centre [y, x]) of ``img``'s object, colours read off
    ``img`` itself: background = median of the four corners, object = median over the real
    object's core (real alpha > 0.9)."""
    bg, rbg = _corner_colour(img), _corner_colour(real)
    near = _object_mask(bbox, size, 3)
    cy, cx = _box_centre(bbox, size)
    robj = real[:, cy, cx]
    core = (_alpha(real, rbg, robj) > 0.9) & near
    obj = img[:, core].median(1).values if core.any() else robj
    a = _alpha(img, bg, obj) * near
    part = a > 0.1
    soft = float(((a > 0.1) & (a < 0.9)).sum() / part.sum().clamp_min(1))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    w = a.sum().clamp_min(1e-6)
    return soft, ((a * ys).sum() / w, (a * xs).sum() / w)


def _two_colour(img: torch.Tensor, bbox, size: int) -> torch.Tensor:
    bg = _corner_colour(img)
    cy, cx = _box_centre(bbox, size)
    obj = img[:, max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2].reshape(3, -1).median(1).values
    inside = ((_alpha(img, bg, obj) * _object_mask(bbox, size, 3)) > 0.5).float()
    return bg.view(3, 1, 1) * (1 - inside) + obj.view(3, 1, 1) * inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="the synthetic benchmark's test shards")
    ap.add_argument("--run", help="a run directory or exported student: take its images apart too")
    ap.add_argument("--n", type=int, default=200, help="seen test captions to use (default: all 200)")
    args = ap.parse_args()

    student, blob = (load_student(args.run) if args.run else (None, None))
    encoder = encoder_from_record(blob["text"]) if blob else None
    size = int(blob["model"]["image_size"]) if blob else 64
    sums: dict[str, float] = {}
    per_shape: dict[str, list[float]] = {}
    n = 0
    gen = torch.Generator().manual_seed(0)
    for batch in iter_batches(expand_urls(args.shards), image_size=size, batch_size=50, text_encoder=encoder,
                              shuffle=False, seed=0, epochs=1, caption="first"):
        keep = [i for i, m in enumerate(batch["meta"]) if m.get("split_kind") == "seen"][: args.n - n]
        if not keep:
            continue
        real = batch["image"][keep].float()
        metas = [batch["meta"][i] for i in keep]
        redraw = torch.stack([to_tensor(_draw(m["attributes"], size, np.random.default_rng([m["seed"], 99, m["index"]]))[0])
                              for m in metas])
        nominal = torch.stack([to_tensor(_draw(m["attributes"], size, _Middle())[0]) for m in metas])
        rows = {"redraw": _fsim(redraw, real), "nominal": _fsim(nominal, real)}
        if student is not None:
            fake = render(student, torch.as_tensor(batch["text"][keep]).float(), generator=gen)
            near = torch.stack([_object_mask(m["bbox"], size, 2) for m in metas]).unsqueeze(1)
            rows["generated"] = _fsim(fake, real)
            rows["object_from_real"] = _fsim(torch.where(near, real, fake), real)
            rows["background_from_real"] = _fsim(torch.where(near, fake, real), real)
            flat = (real[:, :, 1:] - real[:, :, :-1]).abs().amax(1) < 0.02
            rows["flat_noise"] = float((fake[:, :, 1:] - fake[:, :, :-1]).abs().amax(1)[flat].mean())
            rows["flat_noise_real"] = float((real[:, :, 1:] - real[:, :, :-1]).abs().amax(1)[flat].mean())
            soft_g, soft_r, hard = [], [], []
            for f, r, m in zip(fake, real, metas):
                hard.append(_two_colour(f, m["bbox"], size))
                sg, cg = _geometry(f, r, m["bbox"], size)
                sr, cr = _geometry(r, r, m["bbox"], size)
                soft_g.append(sg)
                soft_r.append(sr)
                d = float(((cg[0] - cr[0]) ** 2 + (cg[1] - cr[1]) ** 2) ** 0.5)
                per_shape.setdefault(m["attributes"]["shape"], []).append(d)
            rows["two_colour"] = _fsim(torch.stack(hard), real)
            rows["soft_edge"] = float(np.mean(soft_g))
            rows["soft_edge_real"] = float(np.mean(soft_r))
        for k, v in rows.items():
            sums[k] = sums.get(k, 0.0) + v * len(keep)
        n += len(keep)
        if n >= args.n:
            break
    out = {k: round(v / n, 4) for k, v in sums.items()}
    out["n"] = n
    if per_shape:
        out["centroid_px"] = {s: round(float(np.mean(v)), 2) for s, v in sorted(per_shape.items())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
