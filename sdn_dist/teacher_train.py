"""Train a VGG19-structured teacher as a classifier on the shards' labels.

    sdn-dist teacher train --shards shards/train --out teacher.pt --preset demo

For data with no ImageNet weights at hand (the synthetic benchmark, small presets): a random
VGG19 cannot teach (see the method notes), one trained on the data's labels can. Structure is the
run's teacher (cfg.model width / image size, average pooling), so the output loads as
``teacher.weights``.

Labels come from each sample's JSON metadata: every scalar entry of ``meta["attributes"]`` (the
synthetic benchmark: shape, colour, ...) and/or ``meta["label"]`` (CUB-style class id). One linear
head per label name on the globally averaged pool5 features (= the average of conv5_4 under
average pooling). About 10 % of the samples, chosen by a hash of their key, are held out of
training and measure the accuracy.

Output (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "sdn-dist-teacher/1",
     "state_dict": {features.N.weight/bias ...},        # torchvision VGG19 keys
     "heads": {"<i>.weight": [n_i, C5], "<i>.bias": [n_i]},
     "meta": {"width", "image_size", "pool", "normalize", "mean", "std", "heads": {...}, ...}}
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import Config
from .errors import DataError
from .teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHER_FORMAT, Teacher
from .vgg import scaled_cfg

HELDOUT_MOD = 10          # crc32(key) % 10 == 0 -> held out (~10 %)
HELDOUT_MAX = 1024        # held-out images kept in memory for the accuracy (uint8)
MAX_CLASSES = 1000        # an attribute with more distinct values is not a class label


def _batches(urls, **kw):
    # Imported here: the data package (webdataset, PIL) is not needed to build or load models.
    from .data.pipeline import iter_batches
    return iter_batches(urls, **kw)


def _heldout(key: str) -> bool:
    return zlib.crc32(str(key).encode()) % HELDOUT_MOD == 0


def _labels(meta: dict) -> dict[str, str]:
    """Scalar class labels of one sample, as strings: {"shape": "circle", ..., "label": "17"}."""
    out = {}
    attrs = meta.get("attributes")
    if isinstance(attrs, dict):
        for k, v in attrs.items():
            # bool/int/str are classes; floats (positions, sizes) are not.
            if isinstance(v, (str, bool, int)):
                out[str(k)] = str(v)
    if isinstance(meta.get("label"), (int, str)) and not isinstance(meta.get("label"), bool):
        out["label"] = str(meta["label"])
    return out


def _sort_key(v: str):
    return (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v)


class AttributeHeads(nn.Module):
    """One linear classifier per label name on globally averaged pool5 features [B, C5]."""

    def __init__(self, in_features: int, classes: dict[str, list[str]]):
        super().__init__()
        self.names = list(classes)
        self.classes = classes
        self.index = {n: {v: i for i, v in enumerate(c)} for n, c in classes.items()}
        self.heads = nn.ModuleList(nn.Linear(in_features, len(classes[n])) for n in self.names)

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        return [h(pooled) for h in self.heads]

    def targets(self, metas: list[dict]) -> torch.Tensor:
        """[B, n_heads] class indices, -100 (ignored) where a sample lacks the label or has a
        value the scan did not see."""
        t = torch.full((len(metas), len(self.names)), -100, dtype=torch.long)
        for b, meta in enumerate(metas):
            labels = _labels(meta)
            for j, n in enumerate(self.names):
                t[b, j] = self.index[n].get(labels.get(n), -100)
        return t


def _pooled(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    return teacher(images)["pool5"].mean(dim=(2, 3))  # [B, C5, h, w] -> [B, C5]


def _scan(shards, image_size: int, batch_size: int, seed: int):
    """One ordered pass: label vocabulary over all samples + the held-out images."""
    values: dict[str, set[str]] = {}
    held_img, held_meta, n = [], [], 0
    for batch in _batches(shards, image_size=image_size, batch_size=batch_size, text_encoder=None,
                          shuffle=False, seed=seed, epochs=1, caption="first"):
        for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
            n += 1
            for k, v in _labels(meta).items():
                values.setdefault(k, set()).add(v)
            if _heldout(key) and len(held_img) < HELDOUT_MAX:
                held_img.append((batch["image"][i] * 255).round().to(torch.uint8))
                held_meta.append(meta)
    classes = {k: sorted(v, key=_sort_key) for k, v in values.items() if 2 <= len(v) <= MAX_CLASSES}
    return classes, held_img, held_meta, n


@torch.no_grad()
def _accuracy(teacher: Teacher, heads: AttributeHeads, images: list[torch.Tensor],
              metas: list[dict], batch_size: int) -> dict[str, float | None]:
    correct = torch.zeros(len(heads.names))
    total = torch.zeros(len(heads.names))
    for s in range(0, len(images), batch_size):
        x = torch.stack(images[s:s + batch_size]).float() / 255
        t = heads.targets(metas[s:s + batch_size])
        for j, logits in enumerate(heads(_pooled(teacher, x))):
            ok = t[:, j] >= 0
            correct[j] += (logits.argmax(1)[ok] == t[ok, j]).sum()
            total[j] += ok.sum()
    return {n: (round(float(correct[j] / total[j]), 4) if total[j] else None)
            for j, n in enumerate(heads.names)}


def _save_atomic(obj: Any, out: str) -> str:
    """torch.save to a temporary name beside ``out``, then rename: a crash never leaves a
    half-written teacher where a run would load it."""
    fs, path = fsspec.core.url_to_fs(out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        torch.save(obj, f)
    fs.mv(tmp, path)
    return out


def train_teacher(cfg: Config, shards: str, out: str, progress: bool = True) -> dict:
    """Train the teacher trunk + attribute heads with Adam (cfg.teacher.train), write ``out``.

    Returns {"path", "accuracy": {label name: held-out accuracy}, "heldout_samples",
    "train_samples_scanned", "steps", "final_loss"}.
    """
    tcfg = cfg.teacher.train
    model_cfg = cfg.model.model_copy(update={"pool": "avg", "distill_fc7": False})
    size = model_cfg.image_size
    torch.manual_seed(cfg.seed)

    classes, held_img, held_meta, n_scanned = _scan(shards, size, tcfg.batch_size, cfg.seed)
    if not classes:
        raise DataError(f"shards {shards}: no usable labels (need meta 'attributes' with 2+ values "
                        f"per name, or meta 'label'); `teacher train` trains a classifier on them")

    teacher = Teacher(model_cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # trainable, not frozen
    c5 = int(scaled_cfg(model_cfg.width)[-2])
    heads = AttributeHeads(c5, classes)
    params = list(teacher.parameters()) + list(heads.parameters())
    opt = torch.optim.Adam(params, lr=tcfg.lr)
    teacher.train()
    heads.train()

    stream = _batches(shards, image_size=size, batch_size=tcfg.batch_size, text_encoder=None,
                      shuffle=True, seed=cfg.seed, epochs=None, caption="first")
    bar = tqdm(total=tcfg.steps, desc="teacher", disable=not progress, unit="step")
    step, loss_ema = 0, None
    for batch in stream:
        keep = [i for i, k in enumerate(batch["key"]) if not _heldout(k)]
        if not keep:
            continue
        x = batch["image"][keep]
        t = heads.targets([batch["meta"][i] for i in keep])
        losses = [F.cross_entropy(logits, t[:, j], ignore_index=-100)
                  for j, logits in enumerate(heads(_pooled(teacher, x))) if (t[:, j] >= 0).any()]
        if not losses:
            continue
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if step >= tcfg.steps:
            break
    bar.close()
    if step == 0:
        raise DataError(f"shards {shards}: no labelled training samples outside the held-out split")

    teacher.eval()
    accuracy = _accuracy(teacher, heads, held_img, held_meta, tcfg.batch_size) if held_img else {}
    meta = {
        "width": model_cfg.width,
        "image_size": size,
        "pool": "avg",
        "normalize": "imagenet",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "heads": {
            "input": "pool5 averaged over height and width -> [B, C5]",
            "in_features": c5,
            "names": heads.names,
            "classes": classes,
            "keys": "heads['<i>.weight'] [n_classes_i, C5], heads['<i>.bias'] [n_classes_i]; i = index in names",
        },
        "accuracy": {k: v for k, v in accuracy.items() if v is not None},
        "heldout_samples": len(held_img),
        "steps": step,
        "lr": tcfg.lr,
        "batch_size": tcfg.batch_size,
        "seed": cfg.seed,
        "shards": shards if isinstance(shards, (str, list)) else str(shards),
    }
    obj = {
        "format": TEACHER_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
        "heads": {k: v.detach().cpu() for k, v in heads.heads.state_dict().items()},
        "meta": meta,
    }
    _save_atomic(obj, out)
    return {"path": out, "accuracy": accuracy, "heldout_samples": len(held_img),
            "train_samples_scanned": n_scanned, "steps": step,
            "final_loss": round(loss_ema, 4) if loss_ema is not None else None}
