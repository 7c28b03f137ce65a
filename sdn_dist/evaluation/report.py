"""`sdn-dist eval`: the quality report of a trained student on test shards.

    sdn-dist eval --checkpoint runs/demo --shards 'shards/synth/test-*.tar' --out report.json
    from sdn_dist.evaluation.report import evaluate
    report = evaluate("runs/demo", "shards/synth/test-*.tar", "report.json", limit=0)

For every test sample (in shard order, up to ``limit``): its *first* caption (deterministic) is
encoded with the run's text encoder (or its stored embedding row, for ``precomputed`` runs), the
student generates one image at the model's resolution, and that image is compared with the
sample's own real image, read at the same resolution. Outputs, beside each other:

* ``out`` (``report.json``): the numbers (see docs/evaluation.md for exactly what each means);
* ``<out stem>.txt``: the same as a short table for people;
* ``<out stem>-grid.png``: generated (top row) vs real (bottom row) for the first ``grid`` samples.

Metrics: SSIM and FSIM (piq, data range 1, on the 0..1 images at the model's native size; mean
over images); on data with labels, per-attribute accuracy of an independent evaluator
(:mod:`sdn_dist.evaluation.judge`, never the teacher) on the generated images and, as the ceiling, on
the real test images, overall and per ``meta["split_kind"]`` (the benchmark's ``seen`` /
``paraphrase`` / ``heldout``); optionally, with Inception-v3 weights the user supplies, the
Inception Score of the generated images and their FID against the paired real test images.
"""

from __future__ import annotations

import logging
import json
import math
import time
from typing import Any

import numpy as np
import piq
import torch
import torch.nn.functional as F
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, _inception_v3
from torchvision.models import inception_v3
from tqdm import tqdm

from sdn_dist import fsio
from sdn_dist.data.labels import sample_labels
from sdn_dist.data.pipeline import SkipCounter, iter_batches
from sdn_dist.data.shards import expand_urls
from sdn_dist.data.text import encoder_from_record
from sdn_dist.errors import DataError, UserError
from sdn_dist.pipeline import default_device, render
from sdn_dist.evaluation.judge import (MAX_SIDE, describe, evaluator_matches, load_evaluator, save_evaluator,
                                       train_evaluator)
from sdn_dist.training.export import load_student, resolve, write_card_with_report
from sdn_dist.training.grids import grid_png

log = logging.getLogger(__name__)

REPORT_FORMAT = "sdn-dist-eval/1"
INCEPTION_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IS_MAX_SPLITS = 10
IS_MIN_PER_SPLIT = 50


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

def report_paths(out: str) -> dict[str, str]:
    """report.json -> {"report": report.json, "summary": report.txt, "grid": report-grid.png}."""
    stem = out[:-5] if out.lower().endswith(".json") else out
    return {"report": out, "summary": stem + ".txt", "grid": stem + "-grid.png"}


def run_dir_of(checkpoint: str) -> str:
    """Where the run's evaluator cache lives: the run directory (``RUN/export``, a file in it, or
    ``RUN/export/student.pt`` -> ``RUN``), or the folder of a loose exported file."""
    url = checkpoint.rstrip("/")
    if url.rsplit("/", 1)[-1] in ("model.safetensors", "config.json", "README.md"):
        url = url.rsplit("/", 1)[0] if "/" in url else "."
    if url.rsplit("/", 1)[-1] == "export":
        return url.rsplit("/", 1)[0] if "/" in url else "."
    if not url.endswith(".pt"):
        return url
    parent = url.rsplit("/", 1)[0] if "/" in url else "."
    if parent.rsplit("/", 1)[-1] == "export":
        return parent.rsplit("/", 1)[0] if "/" in parent else "."
    return parent


# ----------------------------------------------------------------------------------------------
# Inception network: pool features (FID) and class probabilities (IS)
# ----------------------------------------------------------------------------------------------

FID_CLASSES = 1008   # the TF 2015-12-05 Inception graph behind published FIDs has 1008 outputs
FID_DIMS = 2048      # its pool3 features, the ones FID is defined on


def fid_inception_v3() -> torch.nn.Module:
    """The Inception-v3 variant of the common FID implementations, without weights: pytorch-fid's
    port of the TF graph (torchvision's Inception-v3 with its FIDInceptionA/C/E blocks, whose
    pooling differs, and a 1008-way fc). Its ``state_dict()`` has the layout of pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``. pytorch-fid's own ``fid_inception_v3()`` always
    downloads that file, so the same network is assembled here from its blocks instead."""
    net = _inception_v3(num_classes=FID_CLASSES, aux_logits=False, weights=None)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class InceptionNet(torch.nn.Module):
    """Images [B,3,H,W] in [0,1] -> (pool features [B,2048], logits [B,K]).

    ``variant`` ``"pytorch-fid"``: input resized to 299x299 (bilinear) and scaled to [-1, 1], as
    pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)`` does;
    ``"torchvision"``: resized the same way, ImageNet-normalised, ``transform_input=True``."""

    def __init__(self, net: torch.nn.Module, variant: str):
        super().__init__()
        self.fc, net.fc = net.fc, torch.nn.Identity()   # net now ends at the pooled features
        self.net = net.eval()
        self.variant = variant
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1 if self.variant == "pytorch-fid" else (x - self.mean) / self.std
        feats = self.net(x)
        return feats, self.fc(feats)


def load_inception(url: str, device="cpu") -> InceptionNet:
    """Inception-v3 with the state dict at ``url`` (``weights_only=True``), in eval mode. Two
    layouts: pytorch-fid's FID Inception (``pt_inception-2015-12-05-*.pth``: a 1008-way fc and
    no auxiliary classifier), or a torchvision Inception-v3 state dict (with or without the
    auxiliary classifier; ``transform_input=True``, as torchvision's own ImageNet weights).
    Either may carry a ``module.`` prefix or be wrapped as {"state_dict": ...}."""
    if not fsio.exists(url):
        raise UserError(f"no Inception-v3 weights at {url}")
    state = fsio.load_torch(url, "Inception-v3 weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in {k.removeprefix("module.") for k in state}:
        raise UserError(f"{url} is not an Inception-v3 state dict (no fc.weight)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not isinstance(state["fc.weight"], torch.Tensor) or state["fc.weight"].dim() != 2:
        raise UserError(f"{url} is not an Inception-v3 state dict (fc.weight is not a matrix)")
    aux = any(k.startswith("AuxLogits.") for k in state)
    classes = int(state["fc.weight"].shape[0])
    if classes == FID_CLASSES and not aux:
        variant, net = "pytorch-fid", fid_inception_v3()
    else:
        variant = "torchvision"
        net = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=True,
                           num_classes=classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{url}: not {variant} Inception-v3 weights: {str(e).splitlines()[0][:300]}") from None
    return InceptionNet(net, variant).to(device).eval()


@torch.no_grad()
def inception_outputs(model: InceptionNet, images: torch.Tensor, chunk: int = 16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B,3,H,W] in [0,1] -> (pool features [B,2048] float32, softmax class probabilities
    [B,K] float64), both on the CPU."""
    device = next(model.parameters()).device
    feats, probs = [], []
    for s in range(0, images.shape[0], chunk):
        f, logits = model(images[s:s + chunk].to(device))
        feats.append(f.float().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between two sets of Inception pool features [N,D], [M,D]: the Frechet distance
    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b) of the Gaussians fitted to them
    (unbiased covariances, float64), the quantity pytorch-fid's ``calculate_frechet_distance``
    computes (tests check the two agree).

    Not its arithmetic: scipy's ``sqrtm`` of the 2048x2048 product takes ~40 s per FID on one
    CPU core. Tr sqrt(S_a S_b) is the sum of the square roots of the eigenvalues of S_a S_b,
    which are exactly those of the small Gram form: with centred features X_a [N,D], X_b [M,D],
    the nonzero eigenvalues of S_a S_b are the squared singular values of X_a X_b^T / sqrt((N-1)(M-1)),
    so Tr sqrt = that matrix's nuclear norm (N, M <= D); with more images than dimensions, the
    symmetric form sqrt(S_a) S_b sqrt(S_a) has them too (two symmetric eigendecompositions)."""
    n, m = feats_a.shape[0], feats_b.shape[0]
    if min(n, m) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
    xa, xb = a - mu_a, b - mu_b
    tr_a = float(xa.square().sum()) / (n - 1)
    tr_b = float(xb.square().sum()) / (m - 1)
    if min(n, m) <= a.shape[1]:
        tr_sqrt = float(torch.linalg.matrix_norm(xa @ xb.T, ord="nuc")) / math.sqrt((n - 1) * (m - 1))
    else:
        sa, sb = xa.T @ xa / (n - 1), xb.T @ xb / (m - 1)
        w, v = torch.linalg.eigh(sa)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        tr_sqrt = float(torch.linalg.eigvalsh(root @ sb @ root).clamp_min(0).sqrt().sum())
    d = float((mu_a - mu_b).square().sum()) + tr_a + tr_b - 2 * tr_sqrt
    return max(0.0, d)   # rounding can leave a tiny negative for identical sets


def inception_score(probs: torch.Tensor, splits: int | None = None) -> tuple[float, float, int]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the split's mean prediction -> (mean over
    splits, std over splits, splits). Default splits: 10, fewer so that each holds >= 50 images."""
    n = probs.shape[0]
    if n == 0:
        raise ValueError("no images")
    if splits is None:
        splits = max(1, min(IS_MAX_SPLITS, n // IS_MIN_PER_SPLIT))
    scores = []
    for part in torch.tensor_split(probs.double(), splits):
        p = part.clamp_min(1e-12)
        py = p.mean(dim=0, keepdim=True)
        kl = (p * (p.log() - py.log())).sum(dim=1).mean().clamp_min(0.0)  # >= 0; no rounding below
        scores.append(float(torch.exp(kl)))
    arr = np.asarray(scores)
    return float(arr.mean()), float(arr.std()), int(splits)


# ----------------------------------------------------------------------------------------------
# Accumulation
# ----------------------------------------------------------------------------------------------

class _Tally:
    """Sums for one group of samples (all, or one split kind)."""

    def __init__(self, names: list[str]):
        self.n = 0
        self.ssim = 0.0
        self.fsim = 0.0
        self.correct_gen = {a: 0 for a in names}
        self.correct_real = {a: 0 for a in names}
        self.scored = {a: 0 for a in names}
        # (caption's class, class the evaluator sees in the generated image) -> images; a row's
        # sum is how many scored samples have that class
        self.confusion: dict[str, dict[tuple[int, int], int]] = {a: {} for a in names}

    def metrics(self, classes: dict[str, list[str]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n_images": self.n,
                               "ssim": _r(self.ssim / self.n) if self.n else None,
                               "fsim": _r(self.fsim / self.n) if self.n else None}
        if classes:
            scored = [a for a in classes if self.scored[a]]
            out["attribute_accuracy"] = {a: _r(self.correct_gen[a] / self.scored[a]) for a in scored}
            out["attribute_accuracy_real"] = {a: _r(self.correct_real[a] / self.scored[a]) for a in scored}
            out["attribute_n"] = {a: self.scored[a] for a in scored}
            out["attribute_accuracy_mean"] = _mean(out["attribute_accuracy"])
            out["attribute_accuracy_real_mean"] = _mean(out["attribute_accuracy_real"])
            out["attribute_confusion"] = {a: _confusion(self.confusion[a], classes[a]) for a in scored}
        return out


def _confusion(pairs: dict[tuple[int, int], int], names: list[str]) -> dict[str, dict[str, int]]:
    """{caption's class: {class seen in the generated image: images}}, non-zero cells only."""
    out: dict[str, dict[str, int]] = {}
    for (t, p), c in sorted(pairs.items()):
        out.setdefault(names[t], {})[names[p]] = c
    return out


def _class_counts(pairs: dict[tuple[int, int], int]) -> dict[int, int]:
    """{caption's class: scored samples} from the confusion cells."""
    out: dict[int, int] = {}
    for (t, _), c in pairs.items():
        out[t] = out.get(t, 0) + c
    return out


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


def _mean(d: dict[str, float]) -> float | None:
    return _r(sum(d.values()) / len(d)) if d else None


# ----------------------------------------------------------------------------------------------
# The evaluator: given, cached next to the run, or trained now
# ----------------------------------------------------------------------------------------------

def _get_evaluator(evaluator: str | None, blob: dict, checkpoint: str, image_size: int,
                   steps: int | None, progress: bool, notes: list[str]):
    if evaluator:
        return load_evaluator(evaluator), False
    train_urls = (blob.get("data") or {}).get("train")
    if not train_urls:
        notes.append("attribute accuracy skipped: the checkpoint records no training shards to "
                     "train an evaluator on; pass an evaluator file (evaluator=URL)")
        return None, False
    size = min(int(image_size), MAX_SIDE)
    cache = fsio.join(run_dir_of(checkpoint), "evaluator.pt")
    if fsio.exists(cache):
        try:
            ev = load_evaluator(cache)
            if evaluator_matches(ev, train_urls, size) and steps in (None, ev.meta.get("steps")):
                return ev, False
            notes.append(f"cached evaluator {cache} was trained on other shards, at another size "
                         f"or for another number of steps: retrained")
        except UserError as e:
            notes.append(f"cached evaluator unusable ({e}): retrained")
    if progress:
        log.info(f"training the attribute evaluator on {train_urls} at {size} px (cached as {cache})")
    try:
        res = train_evaluator(train_urls, size, None, steps=steps, progress=progress)
    except DataError as e:
        raise UserError(f"cannot train the attribute evaluator on the run's training shards "
                        f"{train_urls!r} ({e}); make them reachable from here or pass an "
                        f"evaluator file") from None
    ev = res["evaluator"]
    try:
        ev.path = cache
        save_evaluator(ev, cache)
    except Exception as e:  # noqa: BLE001 - a read-only run directory must not fail the eval
        ev.path = ""
        notes.append(f"could not cache the evaluator at {cache}: {type(e).__name__}: {e}")
    return ev, True


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def evaluate(checkpoint: str, shards, out: str, limit: int = 0, *, evaluator: str | None = None,
             inception_weights: str | None = None, evaluator_steps: int | None = None,
             batch_size: int = 64, grid: int = 8, seed: int = 0, device=None,
             progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` (run directory or exported .pt) on the test ``shards``; write
    ``out`` (report.json), its ``.txt`` summary and ``-grid.png``. Returns the report dict.

    ``limit``: evaluate the first N samples only (0 = all). ``evaluator``: URL of an evaluator
    file (:mod:`sdn_dist.evaluation.judge`); without one, on labelled data, the run's cached
    ``evaluator.pt`` is used or trained from the run's training shards. ``inception_weights``:
    URL of Inception-v3 weights (pytorch-fid's FID Inception file or a torchvision state dict);
    the Inception Score and FID are computed only then.
    """
    t0 = time.time()
    if limit is None:
        limit = 0
    if limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all), got {limit}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else default_device()
    student, blob = load_student(checkpoint, device=dev)
    encoder = encoder_from_record(blob["text"])
    image_size = int(blob["model"]["image_size"])
    urls = expand_urls(shards, split="test")
    paths = report_paths(out)
    inception = load_inception(inception_weights, dev) if inception_weights else None
    notes: list[str] = []

    skips = SkipCounter()   # bad samples are skipped, as in training; the report counts them by reason
    batches = iter_batches(urls, image_size=image_size, batch_size=batch_size, text_encoder=encoder,
                           shuffle=False, seed=0, epochs=1, caption="first", skips=skips)
    first = next((b for b in batches if b["key"]), None)
    if first is None:
        raise DataError(f"no readable samples in {shards}" + _skipped_clause(skips.as_dict()))
    labelled = any(sample_labels(m) for m in first["meta"])
    ev, trained = None, False
    if evaluator or labelled:
        ev, trained = _get_evaluator(evaluator, blob, checkpoint, image_size, evaluator_steps,
                                     progress, notes)
    else:
        notes.append("attribute accuracy skipped: the test samples carry no labels "
                     "(meta 'attributes' or 'label')")
    names = ev.names if ev is not None else []
    classes = ev.classes if ev is not None else {}

    tallies: dict[str, _Tally] = {"all": _Tally(names)}
    gen_grid, real_grid, grid_captions = [], [], []
    probs: list[torch.Tensor] = []
    feats_gen: list[torch.Tensor] = []
    feats_real: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(int(seed))
    bar = tqdm(total=limit or None, desc="eval", unit="img", disable=not progress)

    def consume(batch) -> bool:
        n_all = tallies["all"].n
        take = len(batch["key"]) if not limit else min(len(batch["key"]), limit - n_all)
        if take <= 0:
            return False
        real = batch["image"][:take].float()
        text = torch.as_tensor(batch["text"][:take]).float()
        metas = batch["meta"][:take]
        fake = render(student, text, generator=gen)
        ssim = piq.ssim(fake, real, data_range=1.0, reduction="none").flatten()
        fsim = piq.fsim(fake, real, data_range=1.0, reduction="none").flatten()
        kinds = [m.get("split_kind") if isinstance(m, dict) else None for m in metas]
        groups = [["all"] + ([str(k)] if k else []) for k in kinds]
        for g in {k for gs in groups for k in gs}:
            tallies.setdefault(g, _Tally(names))
        for i, gs in enumerate(groups):
            for g in gs:
                tallies[g].n += 1
                tallies[g].ssim += float(ssim[i])
                tallies[g].fsim += float(fsim[i])
        if ev is not None:
            pg, pr, tg = ev.predict(fake), ev.predict(real), ev.targets(metas)
            for a in names:
                for i, gs in enumerate(groups):
                    t = int(tg[a][i])
                    if t < 0:
                        continue
                    for g in gs:
                        tl = tallies[g]
                        tl.scored[a] += 1
                        tl.correct_gen[a] += int(pg[a][i] == t)
                        tl.correct_real[a] += int(pr[a][i] == t)
                        cell = (t, int(pg[a][i]))
                        tl.confusion[a][cell] = tl.confusion[a].get(cell, 0) + 1
        if inception is not None:
            f, p = inception_outputs(inception, fake)
            feats_gen.append(f)
            probs.append(p)
            feats_real.append(inception_outputs(inception, real)[0])
        room = grid - len(gen_grid)
        if room > 0:
            gen_grid.extend(fake[:room])
            real_grid.extend(real[:room])
            grid_captions.extend(batch["captions"][:take][:room])
        bar.update(take)
        return not limit or tallies["all"].n < limit

    go = consume(first)
    for batch in (batches if go else ()):
        if batch["key"] and not consume(batch):
            break
    bar.close()
    n = tallies["all"].n
    if n == 0:
        raise DataError(f"no readable samples in {shards}" + _skipped_clause(skips.as_dict()))

    overall = tallies["all"].metrics(classes)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "checkpoint": resolve(checkpoint),
        "step": blob.get("step"),
        "preset": blob.get("preset"),
        "shards": shards,
        "n_images": n,
        # bad samples met while reading (in shard order up to the last batch read), by the reason
        # labels of sdn_data_samples_skipped_total: {"bad_image": 2, "empty_caption": 1}
        "skipped": skips.as_dict(),
        "n_skipped": skips.total,
        "limit": int(limit),
        "image_size": image_size,
        "caption": "first",
        "ssim": overall["ssim"],
        "fsim": overall["fsim"],
    }
    if ev is not None:
        report["attribute_accuracy"] = overall.get("attribute_accuracy", {})
        report["attribute_accuracy_real"] = overall.get("attribute_accuracy_real", {})
        report["attribute_accuracy_mean"] = overall.get("attribute_accuracy_mean")
        report["attribute_accuracy_real_mean"] = overall.get("attribute_accuracy_real_mean")
        report["attribute_n"] = overall.get("attribute_n", {})
        report["attribute_confusion"] = overall.get("attribute_confusion", {})
        scored = list(report["attribute_accuracy"])
        report["chance"] = {a: _r(1.0 / len(classes[a])) for a in scored}
        conf = tallies["all"].confusion
        report["majority"] = {a: _r(max(_class_counts(conf[a]).values()) / tallies["all"].scored[a])
                              for a in scored}
        unscored = [a for a in names if a not in scored]
        if unscored:
            notes.append(f"not scored (no test sample has a value the evaluator knows): "
                         f"{', '.join(unscored)}")
        report["evaluator"] = {**describe(ev), "trained_now": trained}
    kinds = sorted(k for k in tallies if k != "all")
    if kinds:
        report["by_split"] = {k: tallies[k].metrics(classes) for k in kinds}
    if inception is not None:
        is_mean, is_std, splits = inception_score(torch.cat(probs))
        report["inception_score"] = _r(is_mean)
        report["inception_score_std"] = _r(is_std)
        report["inception_splits"] = splits
        report["inception_weights"] = inception_weights
        report["inception_variant"] = inception.variant
        try:
            report["fid"] = _r(frechet_distance(torch.cat(feats_gen), torch.cat(feats_real)))
            if n < FID_DIMS:
                notes.append(f"FID from {n} < {FID_DIMS} images per set is biased upwards: compare "
                             f"runs at the same number of images")
        except ValueError as e:   # fewer than 2 images
            notes.append(f"FID not computed: {e}")
    report["grid"] = paths["grid"] if gen_grid else None
    report["summary"] = paths["summary"]
    report["grid_captions"] = grid_captions
    report["notes"] = notes
    report["seconds"] = _r(time.time() - t0, 2)

    if gen_grid:
        fsio.atomic_write(paths["grid"], grid_png(torch.stack(gen_grid), torch.stack(real_grid)))
    fsio.atomic_write(paths["summary"], format_report(report))
    fsio.atomic_write(paths["report"], json.dumps(report, indent=2) + "\n")
    if not report["checkpoint"].endswith(".pt"):
        # the export's model card carries the figures of its latest evaluation
        write_card_with_report(report["checkpoint"], blob, report)
    return report


def format_report(report: dict) -> str:
    """The report as a short table for people."""
    lines = [f"sdn-dist eval: {report['n_images']} test images from {report['shards']}",
             f"checkpoint {report['checkpoint']} (step {report.get('step')}, "
             f"{report['image_size']}x{report['image_size']} px, first caption of each sample)",
             f"SSIM {report['ssim']:.4f}   FSIM {report['fsim']:.4f}   "
             f"(generated vs paired real image, mean over images; 1 = identical)"]
    by = report.get("by_split") or {}
    for k, v in by.items():
        lines.append(f"  {k:8s} n={v['n_images']:<6d} SSIM {v['ssim']:.4f}   FSIM {v['fsim']:.4f}")
    skipped = report.get("skipped") or {}
    lines.append(f"skipped {sum(skipped.values())} bad samples" + (
        ": " + ", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else ""))
    acc = report.get("attribute_accuracy")
    if acc is not None:
        ev = report.get("evaluator") or {}
        lines.append("")
        lines.append(f"attribute accuracy by an independent evaluator ({ev.get('arch')}, trained on "
                     f"real training images; not the teacher)")
        head = f"  {'attribute':12s} {'generated':>9s} {'real':>6s} {'chance':>7s}"
        for k in by:
            head += f"   {k + ' gen/real':>17s}"
        lines.append(head)
        for a in acc:
            row = (f"  {a:12s} {acc[a]:9.3f} {report['attribute_accuracy_real'][a]:6.3f} "
                   f"{report['chance'][a]:7.3f}")
            for k, v in by.items():
                g = (v.get("attribute_accuracy") or {}).get(a)
                r = (v.get("attribute_accuracy_real") or {}).get(a)
                row += f"   {_fmt(g) + '/' + _fmt(r):>17s}"
            lines.append(row)
        if acc:
            lines.append(f"  {'mean':12s} {report['attribute_accuracy_mean']:9.3f} "
                         f"{report['attribute_accuracy_real_mean']:6.3f}")
        mistakes = _top_mistakes(report.get("attribute_confusion") or {})
        if mistakes:
            lines.append("most frequent mistakes in the generated images (caption's value -> what "
                         "the evaluator sees; attribute_confusion in report.json has them all)")
            lines.extend(f"  {a:12s} {m}" for a, m in mistakes)
    if "inception_score" in report:
        lines.append("")
        lines.append(f"Inception Score {report['inception_score']:.3f} +- "
                     f"{report['inception_score_std']:.3f} ({report['inception_splits']} splits, "
                     f"weights {report['inception_weights']})")
        if "fid" in report:
            lines.append(f"FID {report['fid']:.3f} (generated vs real test images, "
                         f"{report['inception_variant']} Inception)")
    for note in report.get("notes") or []:
        lines.append(f"note: {note}")
    if report.get("grid"):
        lines.append(f"grid: {report['grid']}")
    return "\n".join(lines) + "\n"


def _skipped_clause(skipped: dict[str, int]) -> str:
    """' (skipped: bad_image 2, empty_caption 1)' or '' when nothing was skipped."""
    return (" (skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")") if skipped else ""


def _top_mistakes(confusion: dict[str, dict[str, dict[str, int]]], top: int = 3) -> list[tuple[str, str]]:
    """[(attribute, "blue -> purple 85, ...")] for each attribute with off-diagonal cells."""
    out = []
    for a, rows in confusion.items():
        off = sorted(((c, t, p) for t, row in rows.items() for p, c in row.items() if p != t), reverse=True)
        if off:
            out.append((a, ", ".join(f"{t} -> {p} {c}" for c, t, p in off[:top])))
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"

