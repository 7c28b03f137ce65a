"""Recovery time and goodput, measured from the records a run writes (driver-side, no Ray).

    from sdn_dist.training.recovery import RunClock, goodput
    clock = RunClock.from_run_dir(out, attempt, started=t0)   # reads the earlier attempts' records
    extra = clock.observe(records)     # -> "recovered" events, for events.jsonl and Prometheus
    summary = clock.summary()          # -> the "summary" event: goodput, recoveries, wall time

**Recovery** (``sdn_train_recovery_seconds``, the ``recovered`` event): the time from a fault to
the end of the first optimizer step after it. Ray Train gives no time of a fault, so the fault is
dated by the last sign of life the run recorded before it: its last step record (every
``metrics.log_every`` steps) or checkpoint / preemption event. A worker-group restart within an
attempt (a worker or node died; ``cause`` ``worker_restart``) is seen as a second ``start`` event;
a rerun that resumes (``cause`` ``preempted`` when the previous attempt ended with a preemption
checkpoint, else ``rerun``: a killed driver, a lost pod) is dated from the previous attempt's last
record in metrics.jsonl / events.jsonl (a rerun of a run that finished, to train more steps,
recovers from nothing). The first step after it is rank 0's ``first_step`` event
(training/loop.py). The figure is an upper bound by up to one logging window: work done after the
last record and lost with the fault counts as recovery.

**Goodput** (the ``summary`` event, printed at the end of `sdn-dist train`): the time an
undisturbed run would have needed for the steps done, divided by the wall time they took:
``steps x median step time / wall time``. ``steps`` is the last step reached (a step redone after
a fault counts once); the median step time is rank 0's, over every logged window of every attempt
(each window weighs as many steps as it holds; robust to the slow first steps and the windows a
fault interrupted); the wall time runs from the start of the first attempt (its driver's start) to
the end of this one. Everything that is not a step is lost time: restarts, reloads, redone steps,
waiting for a rerun, but also start-up, checkpoints and sample grids, so an undisturbed run's
goodput is below 1 too: compare a disturbed run's goodput with an undisturbed one's.
"""

from __future__ import annotations

import json
import time

from sdn_dist import fsio
from sdn_dist.training.collector import event

# Records that show the training was alive at their time (a fault is dated by the last of them).
_ALIVE_EVENTS = ("checkpoint", "preempted", "final", "first_step")


def read_records(url: str) -> list[dict]:
    """The JSON objects of a JSON-lines file; [] when it does not exist; bad lines skipped (a line a
    killed driver left half-written must not stop the rerun)."""
    try:
        text = fsio.read_text(url)
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def median_step_seconds(windows: list[tuple[int, float]]) -> float | None:
    """Weighted median of (steps in window, mean seconds per step in it) pairs: the step time
    below which half of the steps were done. None without steps."""
    windows = sorted((s, n) for n, s in windows if n > 0 and s >= 0)
    total = sum(n for _, n in windows)
    if not total:
        return None
    seen = 0
    for seconds, n in windows:
        seen += n
        if 2 * seen >= total:
            return float(seconds)
    return float(windows[-1][0])


def goodput(steps: int, median_step: float | None, wall_seconds: float) -> float | None:
    """``steps x median step seconds / wall seconds`` (see the module's docstring), at most 1."""
    if not steps or median_step is None or wall_seconds <= 0:
        return None
    return min(1.0, steps * median_step / wall_seconds)


class RunClock:
    """Follows one attempt's records on the driver; knows the earlier attempts' from the run
    directory. ``observe`` returns the ``recovered`` events to log beside the records."""

    def __init__(self, attempt: str, started: float, previous: list[dict]):
        self.attempt = attempt
        self.started = started
        alive = [r for r in previous if _is_alive(r)]
        self.last_alive: float | None = max((r["time"] for r in alive), default=None)
        last = max(alive, key=lambda r: r["time"]) if alive else None
        # a previous attempt that ended with its final event finished: a rerun that trains on (more
        # steps asked for) recovers from no fault
        kind = None if last is None else last.get("event")
        self.rerun_cause = {"preempted": "preempted", "final": None}.get(kind, "rerun")
        firsts = [r["time"] for r in previous if r.get("event") == "attempt" and isinstance(r.get("time"), (int, float))]
        times = [r["time"] for r in previous if isinstance(r.get("time"), (int, float))]
        self.first_start = min(firsts or times or [started])
        # (steps, seconds per step) of rank 0's logged windows, all attempts
        self.windows = [_window(r) for r in previous if _is_step(r) and r.get("rank", 0) == 0]
        self.last_step = max((int(r["step"]) for r in previous if _is_step(r)), default=0)
        self.recoveries: list[dict] = [r for r in previous if r.get("event") == "recovered"]
        self._starts = 0
        self._pending: tuple[float, str, int] | None = None   # (fault time, cause, resumed step)

    @classmethod
    def from_run_dir(cls, out: str, attempt: str, started: float) -> "RunClock":
        """Before this attempt appends to them: the earlier attempts' metrics.jsonl and events.jsonl."""
        previous = read_records(fsio.join(out, "metrics.jsonl")) + read_records(fsio.join(out, "events.jsonl"))
        return cls(attempt, started, previous)

    def attempt_event(self) -> dict:
        """This attempt's first events.jsonl line: when its driver started (goodput's wall time)."""
        return event("attempt", attempt=self.attempt, time=self.started)

    def observe(self, records: list[dict]) -> list[dict]:
        out = []
        for r in records:
            kind = r.get("event")
            if kind == "start":
                self._starts += 1
                step = int(r.get("step", 0))
                if self._starts > 1 and self.last_alive is not None:
                    self._pending = (self.last_alive, "worker_restart", step)
                elif self._starts == 1 and step > 0 and self.last_alive is not None and self.rerun_cause:
                    self._pending = (self.last_alive, self.rerun_cause, step)
            elif kind == "first_step" and self._pending is not None:
                fault, cause, step = self._pending
                self._pending = None
                rec = event("recovered", seconds=round(max(0.0, r["time"] - fault), 3), cause=cause,
                            step=step, first_step=int(r.get("step", step + 1)), fault_time=fault,
                            attempt=self.attempt)
                self.recoveries.append(rec)
                out.append(rec)
            if _is_step(r):
                self.last_step = max(self.last_step, int(r["step"]))
                if r.get("rank", 0) == 0:
                    self.windows.append(_window(r))
            if _is_alive(r):
                self.last_alive = max(self.last_alive or r["time"], r["time"])
        return out

    def summary(self, now: float | None = None) -> dict:
        """The ``summary`` event: goodput and what it is made of, and the recoveries so far."""
        now = time.time() if now is None else now
        wall = now - self.first_start
        median = median_step_seconds(self.windows)
        gp = goodput(self.last_step, median, wall)
        return event("summary", attempt=self.attempt, steps=self.last_step,
                     median_step_seconds=None if median is None else round(median, 6),
                     wall_seconds=round(wall, 3), goodput=None if gp is None else round(gp, 4),
                     recoveries=len(self.recoveries),
                     recovery_seconds=round(sum(float(r.get("seconds", 0.0)) for r in self.recoveries), 3))


def format_summary(s: dict) -> str:
    """One line for the end of `sdn-dist train`."""
    if s.get("goodput") is None:
        return f"goodput: - (no steps timed; wall {s['wall_seconds']:.0f} s)"
    rec = (f", {s['recoveries']} recover{'y' if s['recoveries'] == 1 else 'ies'} took "
           f"{s['recovery_seconds']:.1f} s" if s["recoveries"] else "")
    return (f"goodput {s['goodput']:.3f}: {s['steps']} steps x {s['median_step_seconds']:.4g} s median step "
            f"/ {s['wall_seconds']:.1f} s wall since the first attempt{rec}")


def _is_step(r: dict) -> bool:
    return r.get("event") is None and isinstance(r.get("step"), int) and isinstance(r.get("time"), (int, float))


def _is_alive(r: dict) -> bool:
    return isinstance(r.get("time"), (int, float)) and (r.get("event") is None or r.get("event") in _ALIVE_EVENTS)


def _window(r: dict) -> tuple[int, float]:
    return int(r.get("window_steps") or 1), float(r.get("step_seconds") or 0.0)
