"""The distillation maths: one function, used by both stages, and the stages themselves.

    total, per_point = stage1_loss(teacher(real), student(text), cfg.stage1)
    total, per_point = stage2_loss(teacher(real), teacher(student(text)["image"]), cfg.stage2)

    first, second = stages(cfg.stage1, cfg.stage2)      # Stage objects: config, loss, teacher or not

loss = sum over matched points X of w_X * mean |a_X - b_X|   (l2: mean (a_X - b_X)^2)
with w_X = stageN.point_weights[X], default 1 (the paper: L1, all weights 1). A point whose weight
is 0 is not computed. "fc7" joins when both sides carry it (model.distill_fc7). An extension,
stageN.tv_weight > 0, adds that weight times the generated image's total variation (point "tv").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import piq
import torch
import torch.nn.functional as F

from sdn_dist.config import Stage1Config, StageConfig
from sdn_dist.errors import ConfigError
from sdn_dist.model.plan import FC7, POINTS

KNOWN_POINTS = POINTS + (FC7,)


def check_point_weights(cfg: StageConfig, stage: str) -> None:
    """Raise ConfigError naming ``<stage>.point_weights.<name>`` for an unknown point name."""
    for name in cfg.point_weights:
        if name not in KNOWN_POINTS:
            raise ConfigError(f"unknown matched point '{stage}.point_weights.{name}' "
                              f"(valid: {', '.join(KNOWN_POINTS)})")


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean |x[i+1, j] - x[i, j]| + mean |x[i, j+1] - x[i, j]| of square images [B, C, S, S]:
    piq's anisotropic (l1) total variation, a sum per image, over the C * S * (S - 1) neighbour
    pairs of each direction."""
    c, s = image.shape[1], image.shape[-1]
    return piq.total_variation(image, reduction="mean", norm_type="l1") / (c * s * (s - 1))


def distill_loss(target: dict[str, torch.Tensor], pred: dict[str, torch.Tensor], cfg: StageConfig,
                 stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over points of the mean L1 / L2 distance (+ the image's weighted total
    variation) -> (total, {point: detached loss}).

    ``target`` is the teacher on the real image (constant: detached here so no gradient can reach
    the real-image branch); ``pred`` carries the gradient to the student. Per-point values are the
    unweighted distances, for logging by level.
    """
    check_point_weights(cfg, stage)
    dist = F.l1_loss if cfg.loss == "l1" else F.mse_loss
    missing = [p for p in POINTS if p not in pred or p not in target]
    if missing:
        raise KeyError(f"{stage}: matched point(s) {missing} missing from the teacher or student output")
    points = list(POINTS) + ([FC7] if FC7 in target and FC7 in pred else [])
    total = None
    per_point: dict[str, torch.Tensor] = {}
    for p in points:
        w = float(cfg.point_weights.get(p, 1.0))
        if w == 0.0:
            continue
        d = dist(pred[p], target[p].detach())
        per_point[p] = d.detach()
        total = w * d if total is None else total + w * d
    if cfg.tv_weight:  # pred["image"] is the generated image in both stages
        tv = total_variation(pred["image"])
        per_point["tv"] = tv.detach()
        total = cfg.tv_weight * tv if total is None else total + cfg.tv_weight * tv
    if total is None:  # every weight 0: a zero that still connects to the graph
        total = pred["image"].sum() * 0.0
    return total, per_point


def stage1_loss(teacher_real: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                cfg: StageConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct distillation: teacher activations of the real image vs the student's own tensors."""
    return distill_loss(teacher_real, student, cfg, "stage1")


def stage2_loss(teacher_real: dict[str, torch.Tensor], teacher_generated: dict[str, torch.Tensor],
                cfg: StageConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Indirect distillation: teacher on the real image vs the teacher on the generated image."""
    return distill_loss(teacher_real, teacher_generated, cfg, "stage2")


Loss = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], StageConfig],
                tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the method: its number, its config section, its loss, and whether the
    generated image goes back through the frozen teacher (the gradient flowing through it)."""

    number: int
    config: StageConfig
    loss: Loss
    through_teacher: bool

    def __call__(self, teacher_real: dict[str, torch.Tensor], pred: dict[str, torch.Tensor]):
        """``pred``: the student's output in a stage that does not go through the teacher, else
        the teacher's output on the generated image."""
        return self.loss(teacher_real, pred, self.config)


def stages(stage1: Stage1Config, stage2: StageConfig) -> tuple[Stage, Stage]:
    """The two stages in order: direct, then indirect distillation."""
    return (Stage(1, stage1, stage1_loss, through_teacher=False),
            Stage(2, stage2, stage2_loss, through_teacher=True))
