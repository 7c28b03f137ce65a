"""What workers report to the driver: typed step records and events, through one collecting actor.

Workers never open ports or files for their records: rank r sends its ``StepRecord`` (as JSON) and
events to the ``RecordCollector``; the driver drains it every 0.5 s into metrics.jsonl,
events.jsonl, Prometheus and the progress bar (``training/metrics.py``). The collector is the one
single-owner piece of a run: it is pinned to the driver's node, so losing any other node never takes
it down, and it decides nothing (the stage schedule runs on every rank, ``training/state.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclasses.dataclass
class StepRecord:
    """One rank's logged step: one line of metrics.jsonl (``loss/<point>`` keys for ``points``)."""

    step: int                        # optimizer steps over the whole run
    stage: int
    rank: int
    world_size: int
    node_id: str                     # the Ray node the rank ran on
    attempt: str
    pid: int
    loss: float                      # this rank's loss, mean over the step's micro-batches
    points: dict[str, float]         # per matched point
    lr: float
    samples_per_sec: float           # the whole job's, over the window
    data_wait_seconds: float         # waited for the readers in the window
    step_seconds: float              # mean wall time per step in the window
    window_steps: int
    samples: int                     # samples drawn by all ranks since step 0
    skipped: dict[str, int]          # this rank's cumulative skips by reason
    rss_peak_bytes: int
    reader_rss_peak_bytes: int
    reader_node_ids: list[str] = dataclasses.field(default_factory=list)   # where its batches were decoded
    time: float = dataclasses.field(default_factory=time.time)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        points = d.pop("points")
        return {**d, **{f"loss/{k}": v for k, v in points.items()}}


def event(kind: str, **fields) -> dict:
    """An events.jsonl line: ``checkpoint``, ``final``, ``message`` (``text``) ..."""
    return {"event": kind, "time": time.time(), **fields}


def message(text: str, **fields) -> dict:
    """A line for the user (printed by the driver's progress bar) and for events.jsonl."""
    return event("message", text=text, **fields)


@ray.remote(num_cpus=0)
class RecordCollector:
    """An async actor: ``until_preempted`` calls stay pending (one per rank, for the whole attempt)
    without blocking ``report`` and ``drain``."""

    def __init__(self):
        self.records: list[dict] = []
        self._preempted = asyncio.Event()
        self._ranks: set[int] = set()

    async def report(self, records: list[dict]) -> None:
        self.records.extend(records)

    async def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return in_order(out)

    async def preempt(self, rank: int | None = None) -> None:
        """The driver (``rank`` None) or training worker ``rank`` got SIGTERM: every rank's pending
        ``until_preempted`` returns."""
        if rank is not None:
            self._ranks.add(rank)
        self._preempted.set()

    async def until_preempted(self) -> list[int]:
        """Once a preemption is announced: the ranks announced by then ([]: the driver's)."""
        await self._preempted.wait()
        return sorted(self._ranks)


def in_order(records: list[dict]) -> list[dict]:
    """Records in the order they were made. An async actor's calls may run out of the order a rank
    sent them in (Ray orders only a sync actor's), so under load a rank's step 88 could reach
    metrics.jsonl before its step 87; every record carries the time its rank made it."""
    return sorted(records, key=lambda r: r.get("time", 0.0))


def start_collector():
    """The run's collector, on the driver's node (soft=False: never elsewhere)."""
    here = ray.get_runtime_context().get_node_id()
    return RecordCollector.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
