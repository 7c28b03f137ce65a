"""Train a VGG19-structured teacher on what the shards carry: their labels, or their captions.

    sdn-dist teacher train --shards shards/mine --out teacher.pt --preset demo

For data with no ImageNet weights at hand (the synthetic benchmark, small presets, any user's
shards here): a random VGG19 cannot teach (see the method notes), one trained on the data can.
Structure is the run's teacher (cfg.model width / image size, average pooling), so the output
loads as ``teacher.weights``. A directory given as ``--shards`` means its ``train-*`` shards.

``teacher.train.objective`` chooses what it learns (``auto``: labels when the shards carry any,
else captions; the choice is printed):

* ``labels``: every scalar entry of ``meta["attributes"]`` and ``meta["label"]`` (CUB-style class
  id, `shards convert folder`'s label) with 2+ values is a label, all of them by default
  (``teacher.train.labels`` picks some). One linear head per label on pool5
  (``teacher.train.heads``: ``spatial`` = the whole pool5 map flattened, so where things are and
  what colour the object is can be read linearly; ``pooled`` = averaged over height and width).
* ``caption``: the image predicts its caption's embedding (the run's ``text`` encoder; one linear
  head on pool5, cosine distance), so caption-only shards such as img2dataset's train a teacher
  too. Held out, it reports the mean cosine and the recall@1 of the true caption among the
  held-out ones.

Adam with a linear warm-up over the first 5 % of the steps and a cosine decay to zero (a plain
16-conv VGG without normalisation layers trains from scratch far better so than at a constant
rate). About 10 % of the samples, chosen by a hash of their key, are held out of training and
measure the accuracy.

``teacher.train.colour_heads`` (> 0) adds a training aid: a linear 1x1 read-out at every matched
point must predict the input's RGB averaged down to that point's resolution. A classifier needs
the colours only as far as its labels do, and SDN's stage 2 cannot ask the student for a colour the
teacher's features do not carry (docs/history.md, rounds 1-2). The read-outs are dropped
after training.

``teacher.train.level_heads`` ({label: weight}) adds another: at every matched point a linear
classifier on the point's channel means must predict the label (e.g. the object's colour, where
the colour read-outs above predict the mean colour of a region, mostly background at the deep
points). Trained without them, the demo's teachers classified the colour from pool5, but at
their weakest point between conv2_2 and conv4_2 the colour explained only 2-34 % of the variance
of the object-region features (five seeds), room for the student to lose it; with them, seed 1's
teacher held it at 85-99 % at every point from conv1_1 to conv4_2 but conv3_4 and pool3 (40-46 %;
docs/history.md, round 6). Their held-out accuracy per point goes into the file's meta
(``level_heads_accuracy``); the classifiers are dropped after training.

After training, ``teacher.train.rescale`` (default on) rescales the trunk as Gatys et al. (2016)
did for VGG19 in style transfer: each conv's weights and bias are scaled so that the mean
activation of each of its channels over (up to 512) training images and positions is 1, and the
next layer's input weights (the heads, after conv5_4) undo the scale. The classifier computes
exactly the same function; only the size of the activations changes. That matters to SDN, whose
losses are *sums of per-point L1 distances*: trained from scratch, the deep points of this VGG
(conv5_x, pool5) carry activations ~10x those of the shallow ones and dominate both stages;
rescaled, every matched point speaks with a comparable voice, as with the paper's weights of 1.

Output (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "sdn-dist-teacher/1",
     "state_dict": {features.N.weight/bias ...},        # torchvision VGG19 keys
     "heads": {"<i>.weight": [n_i, F], "<i>.bias": [n_i]},   # F = C5*h5*w5 (spatial) or C5 (pooled)
     "meta": {"width", "image_size", "pool", "normalize", "mean", "std", "heads": {...},
              "rescaled": {...} or absent, ...}}
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import zlib
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from tqdm import tqdm

from sdn_dist.config import Config
from sdn_dist.data.labels import class_order, sample_labels
from sdn_dist.data.pipeline import iter_batches
from sdn_dist.data.shards import expand_urls
from sdn_dist.data.text import build_text_encoder
from sdn_dist.errors import ConfigError, DataError, UserError
from sdn_dist.model.teacher import IMAGENET_MEAN, IMAGENET_STD, TEACHER_FORMAT, Teacher
from sdn_dist.model.plan import point_shapes, scaled_cfg
from sdn_dist.net import free_port

HELDOUT_MOD = 10          # crc32(key) % 10 == 0 -> held out (~10 %)
HELDOUT_MAX = 1024        # held-out images kept in memory for the accuracy (uint8)
MAX_CLASSES = 1000        # an attribute with more distinct values is not a class label
RESCALE_IMAGES = 512      # training images (at 64 px; fewer when larger) that set the activation scales

log = logging.getLogger(__name__)


def _heldout(key: str) -> bool:
    return zlib.crc32(str(key).encode()) % HELDOUT_MOD == 0


class AttributeHeads(nn.Module):
    """One linear classifier per label name on pool5 features [B, F] (flattened or averaged)."""

    def __init__(self, in_features: int, classes: dict[str, list[str]], mode: str = "spatial"):
        super().__init__()
        self.mode = mode
        self.names = list(classes)
        self.classes = classes
        self.index = {n: {v: i for i, v in enumerate(c)} for n, c in classes.items()}
        self.heads = nn.ModuleList(nn.Linear(in_features, len(classes[n])) for n in self.names)

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        return [h(pooled) for h in self.heads]

    def targets(self, metas: list[dict]) -> torch.Tensor:
        return _targets(metas, self.names, self.index)

    def loss(self, pooled: torch.Tensor, metas: list[dict], text: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy over the heads that have a label to learn in this batch (None: none)."""
        t = self.targets(metas)
        losses = [F.cross_entropy(logits, t[:, j], ignore_index=-100)
                  for j, logits in enumerate(self(pooled)) if (t[:, j] >= 0).any()]
        return torch.stack(losses).mean() if losses else None


def _targets(metas: list[dict], names: list[str], index: dict[str, dict[str, int]]) -> torch.Tensor:
    """[B, len(names)] class indices, -100 (ignored) where a sample lacks the label or has a
    value the scan did not see."""
    t = torch.full((len(metas), len(names)), -100, dtype=torch.long)
    for b, meta in enumerate(metas):
        labels = sample_labels(meta, with_label=True)
        for j, n in enumerate(names):
            t[b, j] = index[n].get(labels.get(n), -100)
    return t


class CaptionHead(nn.Module):
    """teacher.train.objective=caption: one linear map from pool5 features [B, F] to the caption
    embedding's space [B, D]; the loss is the cosine distance to the sample's caption embedding, so
    any image-caption shards (no labels) teach the trunk what the captions tell apart."""

    def __init__(self, in_features: int, dim: int, mode: str = "spatial"):
        super().__init__()
        self.mode = mode
        self.names = ["caption"]
        self.heads = nn.ModuleList([nn.Linear(in_features, dim)])   # a list: rescale_trunk scales it

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        return [self.heads[0](pooled)]

    def loss(self, pooled: torch.Tensor, metas: list[dict], text: torch.Tensor | None) -> torch.Tensor | None:
        return (1 - F.cosine_similarity(self(pooled)[0], text, dim=1)).mean()


class ColourReadouts(nn.Module):
    """teacher.train.colour_heads: one linear 1x1 conv per matched point (after the image) that
    predicts the input's RGB averaged down to that point's resolution. A training aid only."""

    def __init__(self, channels: dict[str, int]):
        super().__init__()
        self.points = list(channels)
        self.readouts = nn.ModuleList(nn.Conv2d(c, 3, kernel_size=1) for c in channels.values())

    def loss(self, feats: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Mean over points of the MSE between each read-out and the pooled image (in [0, 1])."""
        losses, targets = [], {}
        for p, r in zip(self.points, self.readouts):
            f = feats[p]
            size = tuple(f.shape[-2:])
            if size not in targets:   # 21 points, 6 resolutions: each pooled image made once
                targets[size] = F.adaptive_avg_pool2d(images, size)
            losses.append(F.mse_loss(r(f), targets[size]))
        return torch.stack(losses).mean()


class LevelHeads(nn.Module):
    """teacher.train.level_heads: per label name, one linear classifier per matched point (after
    the image) on the point's channel means, so that the trunk's levels carry the label, not only
    what pool5's heads need. A training aid only, dropped after training."""

    def __init__(self, channels: dict[str, int], classes: dict[str, list[str]], weights: dict[str, float]):
        super().__init__()
        self.points = list(channels)
        self.names = list(weights)
        self.index = {n: {v: i for i, v in enumerate(classes[n])} for n in weights}
        self.weights = [float(w) for w in weights.values()]
        self.readouts = nn.ModuleList(
            nn.ModuleList(nn.Linear(c, len(classes[n])) for c in channels.values()) for n in weights)

    def logits(self, feats: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
        """[label][point] -> logits [B, n_classes]."""
        means = [feats[p].mean(dim=(2, 3)) for p in self.points]
        return [[r(m) for r, m in zip(per_point, means)] for per_point in self.readouts]

    def loss(self, feats: dict[str, torch.Tensor], metas: list[dict]) -> torch.Tensor:
        """Weighted sum over labels of the mean over points of the cross-entropy."""
        t = _targets(metas, self.names, self.index)
        total = torch.zeros(())
        for j, (w, per_point) in enumerate(zip(self.weights, self.logits(feats))):
            if (t[:, j] >= 0).any():
                ce = [F.cross_entropy(lg, t[:, j], ignore_index=-100) for lg in per_point]
                total = total + w * torch.stack(ce).mean()
        return total


def _head_input(pool5: torch.Tensor, mode: str) -> torch.Tensor:
    """pool5 [B, C5, h, w] -> [B, C5*h*w] (spatial) or [B, C5] (pooled)."""
    return pool5.flatten(1) if mode == "spatial" else pool5.mean(dim=(2, 3))


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> LRScheduler:
    """The learning rate over ``steps`` optimizer steps: a linear warm-up over the first 5 % of
    them (step s < w: (s + 1) / w of the rate, w = max(1, steps // 20)), then a cosine decay to 0
    (step s >= w: (1 + cos(pi (s - w) / (steps - w))) / 2)."""
    warm = max(1, steps // 20)
    return SequentialLR(opt, [LinearLR(opt, start_factor=1 / warm, total_iters=max(1, warm - 1)),
                              CosineAnnealingLR(opt, T_max=max(1, steps - warm), eta_min=0.0)],
                        milestones=[warm])


@torch.no_grad()
def rescale_trunk(teacher: Teacher, heads: AttributeHeads | None, images: torch.Tensor,
                  head_mode: str = "spatial", eps: float = 1e-6) -> list[float]:
    """Scale each conv so that every output channel's mean activation over ``images`` and
    positions is 1, compensating in the next conv's input weights (and, after the last conv, in
    the heads): the network's output is unchanged (ReLU and average pooling commute with a
    positive per-channel scale). A channel that never fires keeps its scale. Returns the mean
    activation of each conv layer before rescaling (for the record)."""
    convs = [m for m in teacher.features if isinstance(m, nn.Conv2d)]
    x = teacher.normalize(images)
    before, prev_scale = [], None
    ci = 0
    for m in teacher.features:
        if isinstance(m, nn.Conv2d):
            if prev_scale is not None:   # undo the previous layer's scale on this layer's input
                m.weight.mul_(prev_scale.view(1, -1, 1, 1))
            act = F.relu(m(x))
            mean = act.mean(dim=(0, 2, 3))                       # [C]
            before.append(round(float(mean.mean()), 4))
            scale = torch.where(mean > eps, 1.0 / mean.clamp_min(eps), torch.ones_like(mean))
            m.weight.mul_(scale.view(-1, 1, 1, 1))
            m.bias.mul_(scale)
            prev_scale = 1.0 / scale                              # next input is x * scale
            ci += 1
            x = m(x)
        else:
            x = m(x)
    assert ci == len(convs)
    if heads is not None and prev_scale is not None:
        # pool5 channel c is now scaled by 1/prev_scale[c]: heads take [C5*h*w] (c-major) or [C5].
        reps = 1 if head_mode == "pooled" else x.shape[2] * x.shape[3]
        col = prev_scale.repeat_interleave(reps)
        for h in heads.heads:
            h.weight.mul_(col.view(1, -1))
    return before


def _scan(shards, image_size: int, batch_size: int, seed: int):
    """One ordered pass: label vocabulary over all samples + the held-out images and their first
    captions."""
    values: dict[str, set[str]] = {}
    held_img, held_meta, held_caps, n = [], [], [], 0
    for batch in iter_batches(shards, image_size=image_size, batch_size=batch_size, text_encoder=None,
                              shuffle=False, seed=seed, epochs=1, caption="first"):
        for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
            n += 1
            for k, v in sample_labels(meta, with_label=True).items():
                values.setdefault(k, set()).add(v)
            if _heldout(key) and len(held_img) < HELDOUT_MAX:
                held_img.append((batch["image"][i] * 255).round().to(torch.uint8))
                held_meta.append(meta)
                held_caps.append(batch["captions"][i])
    classes = {k: sorted(v, key=class_order) for k, v in values.items() if 2 <= len(v) <= MAX_CLASSES}
    return classes, held_img, held_meta, held_caps, n


def choose_objective(tcfg, classes: dict[str, list[str]], shards) -> tuple[str, dict[str, list[str]]]:
    """(objective, the label classes it learns): teacher.train.objective, with auto = the shards'
    labels when they carry any, else their captions; teacher.train.labels picks among the labels."""
    objective = tcfg.objective
    if objective == "auto":
        objective = "labels" if classes else "caption"
    if objective == "caption":
        return objective, {}
    if tcfg.labels:
        unknown = [n for n in tcfg.labels if n not in classes]
        if unknown:
            raise ConfigError(f"teacher.train.labels: {unknown} not among the labels of {shards} "
                              f"(they carry: {', '.join(classes) or 'none'})")
        classes = {n: classes[n] for n in tcfg.labels}
    if not classes:
        raise DataError(f"shards {shards}: no usable labels for teacher.train.objective=labels (need meta "
                        f"'attributes' with 2+ values per name, or meta 'label'); "
                        f"teacher.train.objective=caption (or auto) learns from the captions instead")
    return objective, classes


@torch.no_grad()
def _caption_scores(teacher: Teacher, head: CaptionHead, images: list[torch.Tensor], captions: list[str],
                    text: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Held-out images: mean cosine of the predicted and the true caption embedding, and recall@1 of
    the caption among the held-out ones (a hit when the nearest caption has the true caption's text)."""
    pred = torch.cat([head(_head_input(teacher(torch.stack(images[s:s + batch_size]).float() / 255)["pool5"],
                                        head.mode))[0] for s in range(0, len(images), batch_size)])
    cos = F.cosine_similarity(pred, text, dim=1)
    sims = F.normalize(pred, dim=1) @ F.normalize(text, dim=1).T
    nearest = sims.argmax(dim=1).tolist()
    hits = sum(captions[j] == captions[i] for i, j in enumerate(nearest))
    return {"caption_cosine": round(float(cos.mean()), 4), "caption_recall_at_1": round(hits / len(captions), 4),
            "caption_candidates": len(set(captions))}


@torch.no_grad()
def _accuracy(teacher: Teacher, heads: AttributeHeads, images: list[torch.Tensor],
              metas: list[dict], batch_size: int) -> dict[str, float | None]:
    correct = torch.zeros(len(heads.names))
    total = torch.zeros(len(heads.names))
    for s in range(0, len(images), batch_size):
        x = torch.stack(images[s:s + batch_size]).float() / 255
        t = heads.targets(metas[s:s + batch_size])
        for j, logits in enumerate(heads(_head_input(teacher(x)["pool5"], heads.mode))):
            ok = t[:, j] >= 0
            correct[j] += (logits.argmax(1)[ok] == t[ok, j]).sum()
            total[j] += ok.sum()
    return {n: (round(float(correct[j] / total[j]), 4) if total[j] else None)
            for j, n in enumerate(heads.names)}


@torch.no_grad()
def _level_accuracy(teacher: Teacher, levels: LevelHeads, images: list[torch.Tensor], metas: list[dict],
                    batch_size: int) -> dict[str, dict[str, float]]:
    """teacher.train.level_heads: {label: {point: held-out accuracy of that level's read-out}}."""
    correct = torch.zeros(len(levels.names), len(levels.points))
    total = torch.zeros(len(levels.names))
    for s in range(0, len(images), batch_size):
        t = _targets(metas[s:s + batch_size], levels.names, levels.index)
        logits = levels.logits(teacher(torch.stack(images[s:s + batch_size]).float() / 255))
        for j, per_point in enumerate(logits):
            ok = t[:, j] >= 0
            total[j] += ok.sum()
            for k, lg in enumerate(per_point):
                correct[j, k] += (lg.argmax(1)[ok] == t[ok, j]).sum()
    return {n: {p: round(float(correct[j, k] / total[j]), 4) for k, p in enumerate(levels.points)}
            for j, n in enumerate(levels.names) if total[j]}


def _loss(teacher: Teacher, heads: AttributeHeads | CaptionHead, readouts: ColourReadouts | None,
          levels: LevelHeads | None, tcfg, x: torch.Tensor, metas: list[dict],
          text: torch.Tensor | None) -> torch.Tensor | None:
    """The mean training loss of images ``x``: the objective's heads (+ colour read-outs, + level
    heads); None when the heads have nothing to learn from these samples."""
    if not metas:
        return None
    feats = teacher(x)
    loss = heads.loss(_head_input(feats["pool5"], tcfg.heads), metas, text)
    if loss is None:
        return None
    if readouts is not None:
        loss = loss + tcfg.colour_heads * readouts.loss(feats, x)
    if levels is not None:
        loss = loss + levels.loss(feats, metas)
    return loss


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
    "train_samples_scanned", "steps", "final_loss"}. With ``teacher.train.processes`` = N > 1 the
    training runs in N spawned processes on this machine, data-parallel (torch's
    DistributedDataParallel over gloo on 127.0.0.1), each with its own default process group: the
    calling process keeps whatever it holds (a DeepSpeed engine's group, a test's). Every rank reads
    the same batches (same seed) and trains on its contiguous share of each one; the loss of each
    share is scaled by share x N, so DDP's average of the ranks' gradients is the gradient of the
    whole batch's mean loss and every rank takes the one-process Adam step (up to float rounding:
    the sum runs in another order). On CPUs small convolutions scale poorly over threads: 400 of
    the demo's teacher steps took 57 and 69 s in one 2-thread process, 47 and 44 s in two 1-thread
    ones (docs/performance.md). Rank 0 writes ``out``; bad input raises the same UserError as in
    one process.
    """
    world = cfg.teacher.train.processes
    if world == 1:
        return _train(cfg, shards, out, progress)
    threads = max(1, torch.get_num_threads() // world)
    port = free_port()
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]   # (receive, send): what a rank ended with
    level = logging.getLogger("sdn_dist").getEffectiveLevel() if logging.getLogger("sdn_dist").handlers else None
    ranks = [ctx.Process(target=_rank_main, name=f"sdn-teacher-rank{r}", daemon=True,
                         args=(cfg, shards, out if r == 0 else "", progress and r == 0, r, world, port, threads,
                               level if r == 0 else None, pipes[r][1]))
             for r in range(world)]
    for p in ranks:
        p.start()
    try:
        reports = _wait(ranks, [receive for receive, _ in pipes])
    finally:
        for p in ranks:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
    kind, value = reports[0] or ("failed", None)
    if kind == "result":
        return value
    if kind == "user":      # bad input: every rank found the same, and it names the key or file
        raise value
    # A rank killed by a signal comes first: the others' errors ("connection reset by peer") follow from it.
    why = next((f"its rank {p.name} (pid {p.pid}) was killed by signal {-p.exitcode}"
                for p in ranks if p.exitcode is not None and p.exitcode < 0), None)
    why = why or next((f"its rank {r} of {world} failed: {v}" for r, (k, v) in enumerate(filter(None, reports))
                       if k == "failed" and v), None)
    why = why or next((f"its rank {p.name} (pid {p.pid}) exited with status {p.exitcode}"
                       for p in ranks if p.exitcode), "a rank ended without a result")
    raise RuntimeError(f"teacher training with teacher.train.processes={world}: {why}; nothing was written to {out}")


def _wait(ranks: list, received: list) -> list[tuple[str, Any] | None]:
    """Each rank's report ((kind, value) or None), once every rank has ended; when one fails, the
    others get 30 s to end on their own (a peer gone ends their collectives), then are stopped."""
    reports: list[tuple[str, Any] | None] = [None] * len(ranks)
    failed_at = None
    while True:
        for r, receive in enumerate(received):
            if reports[r] is None and receive.poll():
                reports[r] = receive.recv()
        if all(not p.is_alive() for p in ranks):
            break
        if failed_at is None and any(p.exitcode for p in ranks):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 30:
            break
        time.sleep(0.1)
    for r, receive in enumerate(received):
        if reports[r] is None and receive.poll():
            reports[r] = receive.recv()
    return reports


def _rank_main(cfg: Config, shards: str, out: str, progress: bool, rank: int, world: int, port: int,
               threads: int, log_level: int | None, send) -> None:
    """A spawned rank: its own default process group (gloo), its share of every batch; rank 0
    writes the file. Reports ("result", dict) from rank 0, ("user", the UserError) or ("failed",
    why) to the caller."""
    if log_level is not None:   # rank 0: the caller's sdn_dist log (progress lines off a terminal)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("sdn_dist").addHandler(handler)
        logging.getLogger("sdn_dist").propagate = False
        logging.getLogger("sdn_dist").setLevel(log_level)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        result = _train(cfg, shards, out, progress)
        send.send(("result", result))
    except UserError as e:
        send.send(("user", e))
        sys.exit(2)   # bad input: rank 0 says so in the caller; no traceback
    except BaseException as e:
        send.send(("failed", f"{type(e).__name__}: {e}"))
        raise     # multiprocessing prints the traceback to stderr
    finally:
        dist.destroy_process_group()


class TrainingLoss(nn.Module):
    """The trainable parts (trunk, objective heads, training aids) as one module whose forward is
    a rank's training loss, so that one DistributedDataParallel wraps them all."""

    def __init__(self, teacher: Teacher, heads: nn.Module, readouts: ColourReadouts | None,
                 levels: LevelHeads | None, tcfg):
        super().__init__()
        self.teacher, self.heads, self.readouts, self.levels, self.tcfg = teacher, heads, readouts, levels, tcfg

    def forward(self, x: torch.Tensor, metas: list[dict], text: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss x scale to back-propagate, the loss or None when this share has nothing to learn).
        With nothing to learn the first is a zero that reaches every parameter: each rank must run
        the backward in which DDP averages the gradients, whatever its share held."""
        loss = _loss(self.teacher, self.heads, self.readouts, self.levels, self.tcfg, x, metas, text)
        if loss is None:
            return torch.stack([p.sum() for p in self.parameters()]).sum() * 0.0, None
        return loss * scale, loss


def _share(keep: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a batch's indices."""
    n = len(keep)
    return keep[n * rank // world: n * (rank + 1) // world]


def _train(cfg: Config, shards: str, out: str, progress: bool) -> dict:
    """One rank's training (the only one, or one of a process group's when torch.distributed is
    initialized here: see :func:`train_teacher`)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tcfg = cfg.teacher.train
    model_cfg = cfg.model.model_copy(update={"pool": "avg", "distill_fc7": False})
    size = model_cfg.image_size
    torch.manual_seed(cfg.seed)

    urls = expand_urls(shards, split="train")   # a directory: its train-* shards, never test-*
    all_classes, held_img, held_meta, held_caps, n_scanned = _scan(urls, size, tcfg.batch_size, cfg.seed)
    objective, classes = choose_objective(tcfg, all_classes, shards)
    encoder = build_text_encoder(cfg.text) if objective == "caption" else None
    if rank == 0:
        what = (f"labels {', '.join(f'{n} ({len(c)} classes)' for n, c in classes.items())}"
                if objective == "labels" else f"captions (the image predicts its caption's {cfg.text.encoder} "
                                              f"embedding, {encoder.dim}-d)")
        print(f"teacher: objective {objective}: {what}; {n_scanned} samples", flush=True)

    teacher = Teacher(model_cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # trainable, not frozen
    c5 = int(scaled_cfg(model_cfg.width)[-2])
    s5 = size // 32
    in_features = c5 * s5 * s5 if tcfg.heads == "spatial" else c5
    heads = (AttributeHeads(in_features, classes, tcfg.heads) if objective == "labels"
             else CaptionHead(in_features, encoder.dim, tcfg.heads))
    params = list(teacher.parameters()) + list(heads.parameters())
    readouts = None
    if tcfg.colour_heads > 0:
        readouts = ColourReadouts({p: c for p, (c, _, _) in point_shapes(model_cfg).items() if p != "image"})
        params += list(readouts.parameters())
    levels = None
    level_weights = {n: w for n, w in tcfg.level_heads.items() if w > 0}
    if level_weights:
        unknown = [n for n in level_weights if n not in all_classes]
        if unknown:
            raise ConfigError(f"teacher.train.level_heads: {unknown} not among the labels of {shards} "
                              f"(they carry: {', '.join(all_classes) or 'none'})")
        levels = LevelHeads({p: c for p, (c, _, _) in point_shapes(model_cfg).items() if p != "image"},
                            all_classes, level_weights)
        params += list(levels.parameters())
    opt = torch.optim.Adam(params, lr=tcfg.lr)
    sched = warmup_cosine(opt, tcfg.steps)
    model = TrainingLoss(teacher, heads, readouts, levels, tcfg)
    if world > 1:   # some heads have no label in a batch's share: their parameters go unused
        model = DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False)
    calib: list[torch.Tensor] = []   # training images for the rescale (uint8)
    n_calib = max(16, RESCALE_IMAGES * 64 * 64 // (size * size))   # 512 at 64 px, 41 at 224 px
    teacher.train()
    heads.train()

    # Captions: each epoch a seeded random one of a sample's captions (more text to learn from);
    # labels: the first (the caption is not read).
    stream_caption = "random" if objective == "caption" else "first"
    stream = iter_batches(urls, image_size=size, batch_size=tcfg.batch_size, text_encoder=encoder,
                          shuffle=True, seed=cfg.seed, epochs=None, caption=stream_caption,
                          keep_in_memory=cfg.data.keep_in_memory, cache_bytes=cfg.data.cache_bytes)
    bar = tqdm(total=tcfg.steps, desc="teacher", disable=not (progress and sys.stderr.isatty()), unit="step")
    # Off a terminal (a log file, ray job submit): plain lines, the first step's and ~20 more.
    plain_every = max(1, tcfg.steps // 20) if progress and not sys.stderr.isatty() and rank == 0 else 0
    step, loss_ema = 0, None
    for batch in stream:
        keep = [i for i, k in enumerate(batch["key"]) if not _heldout(k)]
        if not keep:
            continue
        if tcfg.rescale and rank == 0 and len(calib) < n_calib:   # only rank 0 rescales
            calib.extend((batch["image"][keep[:n_calib - len(calib)]] * 255).round().to(torch.uint8))
        mine = _share(keep, rank, world)
        share = len(mine) / len(keep)    # 1.0 in one process: the same loss, bit for bit
        opt.zero_grad(set_to_none=True)
        scaled, loss = model(batch["image"][mine], [batch["meta"][i] for i in mine],
                             batch["text"][mine] if batch["text"] is not None else None, share * world)
        if world == 1 and loss is None:
            continue
        scaled.backward()    # world > 1: DDP averages the ranks' gradients in here
        # The whole batch's mean loss and whether any rank had something to learn (all ranks agree).
        totals = torch.tensor([0.0 if loss is None else loss.item() * share, float(len(mine) if loss is not None else 0)],
                              dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        value, n = float(totals[0]), int(totals[1])
        if not n:
            continue
        opt.step()
        sched.step()
        step += 1
        loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if plain_every and (step == 1 or step % plain_every == 0 or step == tcfg.steps):
            log.info("teacher step %d/%d  loss %.3f", step, tcfg.steps, loss_ema)
        if step >= tcfg.steps:
            break
    bar.close()
    if step == 0:
        raise DataError(f"shards {shards}: no {'labelled ' if objective == 'labels' else ''}training samples "
                        f"outside the held-out split")
    if rank:
        return {}

    teacher.eval()
    # Before the rescale: the read-outs were trained on the unscaled channels.
    level_accuracy = (_level_accuracy(teacher, levels, held_img, held_meta, tcfg.batch_size)
                      if levels is not None and held_img else {})
    rescaled = None
    if tcfg.rescale and calib:
        before = rescale_trunk(teacher, heads, torch.stack(calib).float() / 255, tcfg.heads)
        rescaled = {"method": "per-channel mean activation 1 over training images and positions "
                              "(Gatys et al. 2016); next layer / heads compensate",
                    "images": len(calib), "mean_activation_before": before}
    if not held_img:
        accuracy = {}
    elif objective == "labels":
        accuracy = _accuracy(teacher, heads, held_img, held_meta, tcfg.batch_size)
    else:
        held_text = torch.from_numpy(encoder.encode(held_caps)) if not encoder.precomputed else None
        accuracy = (_caption_scores(teacher, heads, held_img, held_caps, held_text, tcfg.batch_size)
                    if held_text is not None else {})
    meta = {
        "width": model_cfg.width,
        "image_size": size,
        "pool": "avg",
        "normalize": "imagenet",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "objective": objective,
        "heads": {
            "input": ("pool5 flattened (channel-major) -> [B, C5*h5*w5]" if tcfg.heads == "spatial"
                      else "pool5 averaged over height and width -> [B, C5]"),
            "mode": tcfg.heads,
            "in_features": in_features,
            "names": heads.names,
            "classes": classes,
            "keys": ("heads['<i>.weight'] [n_classes_i, in_features], heads['<i>.bias'] [n_classes_i]; i = index in names"
                     if objective == "labels" else
                     f"heads['0.weight'] [{encoder.dim}, in_features], heads['0.bias']: the caption embedding "
                     f"({cfg.text.encoder}) the image predicts"),
        },
        "schedule": "Adam, linear warm-up 5 % of the steps, cosine decay to 0",
        "colour_heads": tcfg.colour_heads,
        "level_heads": level_weights,
        "level_heads_accuracy": level_accuracy,
        "accuracy": {k: v for k, v in accuracy.items() if v is not None},
        "heldout_samples": len(held_img),
        "steps": step,
        "lr": tcfg.lr,
        "batch_size": tcfg.batch_size,
        "processes": world,
        "seed": cfg.seed,
        "shards": shards if isinstance(shards, (str, list)) else str(shards),
    }
    if rescaled:
        meta["rescaled"] = rescaled
    obj = {
        "format": TEACHER_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
        "heads": {k: v.detach().cpu() for k, v in heads.heads.state_dict().items()},
        "meta": meta,
    }
    _save_atomic(obj, out)
    return {"path": out, "objective": objective, "labels": list(classes), "accuracy": accuracy,
            "heldout_samples": len(held_img),
            "train_samples_scanned": n_scanned, "steps": step,
            "final_loss": round(loss_ema, 4) if loss_ema is not None else None}
