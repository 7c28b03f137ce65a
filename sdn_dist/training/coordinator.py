"""The coordinator: a Ray actor that owns the run's stage and collects what the workers log.

It outlives worker-group restarts (it belongs to the driver), so a restarted group asks it nothing
it cannot recompute: the stage and step of a restart come from the checkpoint. What it decides is
*when* stage 1 ends: at ``stage1.steps``, or earlier when the plateau rule fires. Rank 0 asks it
at each logged step and broadcasts the answer, so all ranks switch together at the same step.
"""

from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0)
class Coordinator:
    def __init__(self, stage1_steps: int, patience: int, min_delta: float):
        self.switch_step = stage1_steps
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("inf")
        self.bad = 0
        self.records: list[dict] = []
        self.status = {"stage": 1, "step": 0, "started": time.time(), "events": []}

    def report(self, records: list[dict]) -> int:
        """Workers send their logged records; returns the (possibly updated) switch step."""
        for r in records:
            self.records.append(r)
            if r.get("rank", 0) == 0:
                self.status.update(stage=r["stage"], step=r["step"])
                if r["stage"] == 1 and self.patience and r["step"] < self.switch_step:
                    self._plateau(r)
        return self.switch_step

    def _plateau(self, r: dict) -> None:
        if r["loss"] < self.best - self.min_delta:
            self.best, self.bad = r["loss"], 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.switch_step = r["step"]
            self.status["events"].append(f"stage 1 plateaued: switching to stage 2 at step {r['step']}")

    def event(self, message: str) -> None:
        self.status["events"].append(message)

    def get_switch_step(self) -> int:
        return self.switch_step

    def drain(self) -> tuple[list[dict], dict]:
        out, self.records = self.records, []
        status = dict(self.status, switch_step=self.switch_step)
        self.status["events"] = []
        return out, status
