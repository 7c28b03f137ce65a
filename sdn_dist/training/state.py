"""What a run is at a step boundary: exactly what a checkpoint saves and a resume restores.

    state = TrainState.start(cfg.stage1, cfg.stage2, world_size)
    state.schedule.stage_at(state.step)                 # 1 or 2
    state.schedule.stage(2)                             # its Stage object (config, loss, teacher or not)
    ckpt.save(engine, state.step, {"train": state, "rng": RNG, "ema": averaged})   # loop.save

Every stateful thing of a run has a ``state_dict()`` / ``load_state_dict()`` pair and is handed to
the Checkpointer by name: ``TrainState`` (JSON: step, stage, schedule, data position), ``RNG`` (the
generators the step draws from), the EMA (torch's ``AveragedModel``) and, through DeepSpeed's own
files, the student, its optimizer and its lr scheduler.

``StageSchedule`` is the stage switch as a small pure object: stage 1 ends at ``stage1.steps``, or
earlier when the plateau rule fires on the loss all ranks agree on (the all-reduced mean), so every
rank runs the same schedule on the same numbers and switches at the same step without asking anyone.
Nothing here knows Ray or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sdn_dist.config import StageConfig
from sdn_dist.errors import UserError
from sdn_dist.model.losses import Stage, stages


@dataclasses.dataclass
class StageSchedule:
    """When stage 1 ends. ``observe`` is called at every logged stage-1 step with the mean loss.

    The step counts come from the config (a rerun with more steps extends the run); what a run has
    decided stays decided: once stage 1 has ended (at ``stage1.steps`` or by the plateau rule),
    ``fixed_switch`` holds that step and a resume keeps it."""

    stage1_steps: int
    stage2_steps: int
    patience: int = 0                # plateau rule: logged steps without improvement (0 = off)
    min_delta: float = 0.0
    best: float = math.inf           # the plateau rule's memory (saved, so a resume continues it)
    bad: int = 0
    fixed_switch: int | None = None
    stages: tuple[Stage, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @classmethod
    def from_stages(cls, stage1: StageConfig, stage2: StageConfig) -> "StageSchedule":
        """The schedule of the config's ``stage1`` and ``stage2`` sections."""
        p = stage1.plateau
        return cls(stage1_steps=stage1.steps, stage2_steps=stage2.steps,
                   patience=p.patience, min_delta=p.min_delta, stages=stages(stage1, stage2))

    def stage(self, number: int) -> Stage:
        """The Stage object of stage ``number`` (1 or 2)."""
        return self.stages[number - 1]

    def switches_after(self, step: int, stage: int) -> bool:
        """True when an engine in ``stage`` has just run that stage's last step (``step``)."""
        return self.stage_at(step) != stage

    @property
    def switch_step(self) -> int:
        """The first step of stage 2 = the number of stage-1 steps."""
        return self.stage1_steps if self.fixed_switch is None else self.fixed_switch

    @property
    def end(self) -> int:
        return self.switch_step + self.stage2_steps

    def stage_at(self, step: int) -> int:
        """The stage the step *after* ``step`` optimizer steps runs in."""
        return 1 if step < self.switch_step else 2

    def observe(self, step: int, loss: float) -> bool:
        """A logged stage-1 step's loss (the same value on every rank). True when the plateau rule
        ends stage 1 here: ``switch_step`` becomes ``step``."""
        if not self.patience or step >= self.switch_step:
            return False
        if loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
            return False
        self.bad += 1
        if self.bad < self.patience:
            return False
        self.fixed_switch = step
        return True

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the schedule (JSON: it is also in the COMPLETE marker)."""
        return {"switch_step": self.switch_step, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue from a checkpoint's ``state_dict()`` taken at ``step`` (the step says whether
        its switch had been reached, and so is decided, or is still only this config's plan)."""
        self.best, self.bad = float(state["best"]), int(state["bad"])
        if state["switch_step"] <= step:    # stage 1 had ended (or ended right there)
            self.fixed_switch = int(state["switch_step"])


@dataclasses.dataclass
class TrainState:
    """The run at a step boundary. ``stage`` is the stage of the optimizer state in the engine
    (a checkpoint taken at the switch holds stage-1 optimizer state although stage 2 comes next)."""

    step: int
    stage: int
    schedule: StageSchedule
    data_position: int               # samples all ranks have drawn from the global stream (good or bad)
    world_size: int                  # the world size the run is at

    @classmethod
    def start(cls, stage1: StageConfig, stage2: StageConfig, world_size: int) -> "TrainState":
        """Step 0 of a run with these ``stage1`` / ``stage2`` sections on ``world_size`` workers."""
        schedule = StageSchedule.from_stages(stage1, stage2)
        return cls(step=0, stage=schedule.stage_at(0), schedule=schedule, data_position=0, world_size=world_size)

    # -- checkpoint form -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON (the Checkpointer also writes it to the COMPLETE marker, so listing checkpoints
        needs no torch.load)."""
        return {"step": self.step, "stage": self.stage, "schedule": self.schedule.state_dict(),
                "data_position": self.data_position, "data_order": "global", "world_size": self.world_size}

    def load_state_dict(self, saved: dict) -> None:
        """Continue from a checkpoint's ``state_dict()`` under this run's config (its step counts)
        at this state's world size. The data position is global (``data_order: global``), so a
        resume on fewer or more workers continues the same sample order. A checkpoint without
        ``data_order`` counted per rank in its own plan: its position becomes the samples drawn in
        all (exact from one worker; from more, that epoch's order changes at the resume, samples
        around the cut may repeat or be skipped)."""
        if "schedule" not in saved:
            raise UserError("the checkpoint was written by an older sdn-dist (no train state in it): "
                            "start a new run directory (`out`) or use the release that wrote it")
        self.step, self.stage = int(saved["step"]), int(saved["stage"])
        self.schedule.load_state_dict(saved["schedule"], self.step)
        self.data_position = int(saved["data_position"])
        if saved.get("data_order") != "global":
            self.data_position *= int(saved["world_size"])


class _RNG:
    """Every RNG the training step draws from, as a stateful thing (the module-level ``RNG``)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return capture_rng()

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        restore_rng(saved)


RNG = _RNG()


def capture_rng() -> dict[str, torch.Tensor]:
    """Every RNG the training step draws from (torch CPU; CUDA where used). The data order and the
    caption choice are seeded by (seed, epoch, key), so they need no state beyond the position."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
