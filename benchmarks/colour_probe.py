"""How well each matched point of a teacher carries the object's colour: a linear probe.

    python benchmarks/colour_probe.py TEACHER.pt --shards 'runs/demo-pipeline/shards/train-*.tar'

For the synthetic benchmark (docs/history.md, "What we tried, round 2"): the teacher's activation
vector at the centre of the object's quadrant, for 1500 training images, standardised; ridge
regression onto the one-hot colour on the first 1200, accuracy (argmax) on the last 300. Chance
is 1/6. Prints one `point:accuracy` per matched point, shallow to deep. A raw pixel (`image`,
3 numbers) is not linearly separable into six colours, hence its low score.

    python benchmarks/colour_probe.py TEACHER.pt --shards '...test-*.tar' --share

--share (round 6): instead, the share of the variance of each point's object-region features
(the activations averaged over the positions of the object's pixels, the object being where the
image differs from its corner pixel by more than 0.3) that the colour explains: between-colour
over total sum of squares, on the first 1500 images. A large share means the colour is a large
direction of the point's features, which a student matching them with L1 cannot leave out.

    python benchmarks/colour_probe.py --captions [--seed 0]

--captions (round 6): the same share for the caption embeddings the demo's student reads (MiniLM,
the first caption of training samples 0-1023 of the synthetic benchmark), per attribute.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sdn_dist.config import load_config
from sdn_dist.data.pipeline import iter_batches
from sdn_dist.apps.synth.dataset import VOCAB
from sdn_dist.model.teacher import build_teacher

N, FIT = 1500, 1200


def _teacher_on_images(teacher_url: str, shards: str, preset: str):
    """-> (teacher, the first N images [N,3,S,S], their metas, colour indices [N])."""
    cfg = load_config(preset, overrides=[f"teacher.weights={teacher_url}"])
    teacher = build_teacher(cfg.model, cfg.teacher).eval()
    images, metas = [], []
    for b in iter_batches(shards, image_size=cfg.model.image_size, batch_size=100, text_encoder=None,
                          shuffle=False, seed=0, epochs=1, caption="first"):
        images.append(b["image"])
        metas += b["meta"]
        if len(metas) >= N:
            break
    x, metas = torch.cat(images)[:N], metas[:N]
    colour = np.array([VOCAB["colour"].index(m["attributes"]["colour"]) for m in metas])
    return teacher, x, metas, colour


def probe(teacher_url: str, shards: str, preset: str = "demo") -> dict[str, float]:
    teacher, x, metas, colour = _teacher_on_images(teacher_url, shards, preset)
    where = [m["attributes"]["position"] for m in metas]
    with torch.no_grad():
        feats = teacher(x)
    out = {}
    for point, f in feats.items():
        s = f.shape[-1]
        rows = [int((0.25 if "top" in q else 0.75) * s) for q in where]
        cols = [int((0.25 if "left" in q else 0.75) * s) for q in where]
        v = torch.stack([f[i, :, rows[i], cols[i]] for i in range(len(metas))]).numpy().astype(np.float64)
        v = (v - v[:FIT].mean(0)) / (v[:FIT].std(0) + 1e-6)
        a = np.c_[v, np.ones(len(v))]
        y = np.eye(len(VOCAB["colour"]))[colour]
        w = np.linalg.solve(a[:FIT].T @ a[:FIT] + 1e-2 * np.eye(a.shape[1]), a[:FIT].T @ y[:FIT])
        out[point] = round(float((np.argmax(a[FIT:] @ w, 1) == colour[FIT:]).mean()), 2)
    return out


def _explained(v: np.ndarray, labels: np.ndarray) -> float:
    """Between-class over total sum of squares of the rows of ``v`` [n, d] grouped by ``labels``."""
    v = v - v.mean(0)
    return float(sum((labels == c).sum() * (v[labels == c].mean(0) ** 2).sum() for c in np.unique(labels))
                 / (v ** 2).sum())


def share(teacher_url: str, shards: str, preset: str = "demo") -> dict[str, float]:
    teacher, x, _, colour = _teacher_on_images(teacher_url, shards, preset)
    obj = ((x - x[..., :1, :1]).abs().sum(1, keepdim=True) > 0.3).float()
    with torch.no_grad():
        feats = teacher(x)
    out = {}
    for point, f in feats.items():
        m = torch.nn.functional.adaptive_avg_pool2d(obj, f.shape[-1])
        v = ((f * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6)).numpy().astype(np.float64)
        out[point] = round(_explained(v, colour), 2)
    return out


def caption_share(seed: int = 0, n: int = 1024) -> dict[str, float]:
    from sdn_dist.apps.synth.dataset import ATTRIBUTES, synth_sample
    from sdn_dist.data.text import build_text_encoder
    samples = [synth_sample("train", i, seed=seed) for i in range(n)]
    e = build_text_encoder(load_config("demo").text).encode([s["captions"][0] for s in samples]).astype(np.float64)
    return {a: round(_explained(e, np.array([s["meta"]["attributes"][a] for s in samples])), 3)
            for a in ATTRIBUTES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("teacher", nargs="?", help="teacher weights (any fsspec URL)")
    ap.add_argument("--shards", help="synthetic training shards (with attributes)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--share", action="store_true", help="the colour's share of each point's object-region variance")
    ap.add_argument("--captions", action="store_true", help="each attribute's share of the caption embeddings' variance")
    ap.add_argument("--seed", type=int, default=0, help="--captions: the benchmark's seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.captions:
        print(" ".join(f"{k}:{v}" for k, v in caption_share(args.seed).items()))
        return
    if not (args.teacher and args.shards):
        ap.error("give TEACHER and --shards (or --captions)")
    fn = share if args.share else probe
    print(" ".join(f"{k}:{v}" for k, v in fn(args.teacher, args.shards, args.preset).items()))


if __name__ == "__main__":
    main()
