"""A chaos run (issue 34 item 4): faults injected at random into a real training run, then checked.

    python benchmarks/chaos.py --minutes 10 --fault-every 90 --seed 1 --out runs/chaos [--docs]

Sets up, on this machine: a local S3 server (moto in server mode) behind a TCP proxy that can take
it down with its data kept, two Ray nodes (tests/cluster.py: a head and a second node, 1 CPU each),
synthetic shards in the bucket. Then runs the real CLI, `sdn-dist train --preset debug workers=1-2`,
attached to the cluster with RAY_ADDRESS, data on S3, the run directory local (``OUT/run``: the
driver rewrites metrics.jsonl whole on every 0.5 s drain when ``out`` is on S3, and an outage of
the store would hit the driver's own logging rather than what this run is about).

A fault thread, every ``--fault-every`` seconds (x 0.7-1.3, seeded), injects one of ``FAULTS``
(chosen with the same seeded RNG) into the real processes:

    worker_sigkill        SIGKILL one training worker (its pid from metrics.jsonl)
    node_bounce           the second node lost (SIGKILL of its processes), added back 5 s later
    driver_sigterm        SIGTERM to the driver; it exits 75 and the same command is run again
    s3_outage             the S3 endpoint resets every connection for 20 s (open ones cut)
    node_sigterm_sigkill  SIGTERM to every process of the second node, SIGKILL 2 s later, added back

Whenever the driver exits (75 after a SIGTERM, or anything else) the same command is run again, as a
user (or a RayJob retry) would. At ``--minutes`` the faults stop, the driver gets a SIGTERM (a clean
preemption stop) and the same command is rerun with the step counts cut to a few steps past the
stop, so that the run completes (final event, export) and its weights can be checked.

Figures (``OUT/chaos.json``, a markdown row on stdout, ``--docs`` appends it to docs/reliability.md):
faults by kind; recovery, p50 and max, two ways (the run's ``recovered`` events, and per fault the
longest pause in training that began after it, ``recovery_seconds``); goodput, two ways (the run's last
``summary`` event, and undisturbed step time x steps / wall time); samples seen twice and lost,
from ``account()`` on the committed lineage (see there); checkpoints that resumed wrong; finite
weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("worker_sigkill", "node_bounce", "driver_sigterm", "s3_outage", "node_sigterm_sigkill")
EXIT_PREEMPTED = 75
OUTAGE_SECONDS = 20.0


# --------------------------------------------------------------------------- exactly-once accounting

@dataclasses.dataclass
class Segment:
    """One worker-group start: it resumed from ``start_step`` (0: a fresh run), where the global
    sample position was ``start_position`` (from that checkpoint's train state; None when unknown),
    ran steps ``start_step + 1 .. last_step`` and committed checkpoints at the steps ``saved``, whose
    train states recorded the global positions ``saved_positions`` (step -> position, where known)."""

    attempt: str
    start_step: int
    start_position: int | None
    last_step: int
    saved: list[int] = dataclasses.field(default_factory=list)
    saved_positions: dict[int, int] = dataclasses.field(default_factory=dict)


def global_position(train_state: dict) -> int:
    """A checkpoint's samples drawn in all: ``data_position`` is the global count with the global
    data order (``data_order: global``), per rank before it (x ``world_size`` then)."""
    dp = int(train_state["data_position"])
    return dp if train_state.get("data_order") == "global" else dp * int(train_state["world_size"])


def account(segments: list[Segment], batch: int, epoch_size: int | None = None) -> dict:
    """Samples seen twice and lost over the committed lineage of a run.

    ``segments`` in the order they started; the last one ended the run. The lineage is walked back
    from it: a segment that resumed from step S continues the latest earlier segment that saved S
    (the steps that one ran after S were rolled back: not committed). Each committed step draws
    ``batch`` consecutive positions of the global sample stream, from the position its segment
    resumed at; position p is sample ``p mod epoch_size`` of epoch ``p // epoch_size`` (one
    permutation per epoch), so a position covered twice is a sample seen twice in its epoch and a
    position below the end that no committed step covered is a sample lost.

    A resume is wrong when the checkpoint's position is not where its lineage had got to by that
    step, or when no earlier segment saved the step resumed from; a checkpoint is wrong when it
    recorded another position than its lineage's at its step (a resume that loaded the position
    wrongly shows at the next save)."""
    chain, cur, wrong = [], segments[-1], []
    index = len(segments) - 1
    while True:
        chain.append(cur)
        if cur.start_step == 0:
            break
        parents = [i for i in range(index) if cur.start_step in segments[i].saved]
        if not parents:
            wrong.append({"step": cur.start_step, "why": "no earlier segment saved it"})
            break
        index = parents[-1]
        cur = segments[index]
    chain.reverse()
    covered: dict[int, int] = {}
    steps: list[tuple[int, int]] = []      # (step, first position) of every committed step
    position = 0 if chain[0].start_step == 0 else chain[0].start_position
    for seg, child in zip(chain, chain[1:] + [None]):
        if seg.start_position is not None and seg.start_position != position:
            wrong.append({"step": seg.start_step, "why": f"resumed at position {seg.start_position}, "
                                                         f"its lineage was at {position}"})
            position = seg.start_position
        end = child.start_step if child is not None else seg.last_step
        for step in range(seg.start_step + 1, end + 1):
            steps.append((step, position))
            for p in range(position, position + batch):
                covered[p] = covered.get(p, 0) + 1
            position += batch
            if seg.saved_positions.get(step, position) != position:
                wrong.append({"step": step, "why": f"its checkpoint recorded position {seg.saved_positions[step]}, "
                                                   f"its lineage was at {position}"})
    top = max(covered, default=-1) + 1
    twice = sum(n - 1 for n in covered.values() if n > 1)
    lost = sum(1 for p in range(top) if p not in covered)
    drawn: set[int] = set()
    doubled = 0          # committed steps that drew a sample an earlier committed step had drawn
    for _, first in steps:
        mine = set(range(first, first + batch))
        doubled += bool(mine & drawn)
        drawn |= mine
    return {"committed_steps": len(steps), "final_step": steps[-1][0] if steps else 0,
            "samples_drawn": top, "epochs": None if not epoch_size else top / epoch_size,
            "seen_twice": twice, "lost": lost, "doubled_steps": doubled,
            "steps_in_order": [s for s, _ in steps] == list(range(1, len(steps) + 1)),
            "resumed_wrong": wrong, "lineage": [(s.attempt, s.start_step, (c.start_step if c else s.last_step))
                                                for s, c in zip(chain, chain[1:] + [None])]}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass        # a line a killed driver left half-written
    return out


def segments_from_run(run: Path, markers: dict[int, list[dict]]) -> list[Segment]:
    """The run's worker-group starts, from events.jsonl (``attempt``, ``start``, ``checkpoint``
    events in file order) and metrics.jsonl (rank 0's step records, matched by the start's pid).
    ``markers``: step -> the COMPLETE train states seen for it (each with its ``time``); a segment's
    start position is that of the newest marker written before it started, and it saved every
    marker written between its start and the next segment's (also when its ``checkpoint`` event was
    lost with the group: a resize or a kill right after the save)."""
    segs: list[Segment] = []
    pids: list[tuple[str, int]] = []
    starts: list[float] = []
    attempt = ""
    for e in read_jsonl(run / "events.jsonl"):
        if e.get("event") == "attempt":
            attempt = e["attempt"]
        elif e.get("event") == "start":
            step = int(e["step"])
            seen = [m for m in markers.get(step, []) if m.get("time", 0) <= e["time"]]
            pos = 0 if step == 0 else (global_position(seen[-1]) if seen else None)
            segs.append(Segment(attempt, step, pos, step))
            pids.append((attempt, e["pid"]))
            starts.append(e["time"])
        elif e.get("event") == "checkpoint" and segs:
            step, seg = int(e["step"]), segs[-1]
            seg.saved.append(step)
            mine = [m for m in markers.get(step, []) if starts[-1] <= m.get("time", 0) <= e["time"]]
            if mine:
                seg.saved_positions[step] = global_position(mine[-1])
    for i, seg in enumerate(segs):
        until = starts[i + 1] if i + 1 < len(segs) else float("inf")
        for step, ms in markers.items():
            mine = [m for m in ms if starts[i] <= m.get("time", 0) < until]
            if mine and step > seg.start_step:
                seg.saved_positions.setdefault(step, global_position(mine[-1]))
                if step not in seg.saved:
                    seg.saved.append(step)
    for r in read_jsonl(run / "metrics.jsonl"):
        if r.get("event") is None and r.get("rank") == 0 and (r.get("attempt"), r.get("pid")) in pids:
            seg = segs[len(pids) - 1 - pids[::-1].index((r["attempt"], r["pid"]))]
            seg.last_step = max(seg.last_step, int(r["step"]))
    return segs


# --------------------------------------------------------------------------- figures

def recovery_seconds(faults: list[dict], records: list[dict], stopped: float = float("inf")) -> list[dict]:
    """Per fault: the longest pause in rank 0's step records that began between its injection and
    the next fault (the injection itself counts as a start: a fault that stopped training at once).
    A SIGTERM stops training only at the next agreement step, a lost node at once; either way the
    pause runs to the first step of the group or rerun that recovered, so it holds the restart, the
    reload and any wait for workers. A fault that did not stop training costs about a step.
    ``stopped``: when the harness stopped the run (its own stop is no fault). None when no step was
    recorded after it."""
    out = []
    times = sorted(r["time"] for r in records if r.get("event") is None and r.get("rank") == 0)
    for i, f in enumerate(faults):
        until = faults[i + 1]["t0"] if i + 1 < len(faults) else stopped
        points = [f["t0"]] + [t for t in times if f["t0"] < t]
        if points[-1] > stopped:   # the pause the harness's stop made is not the fault's
            points = [t for t in points if t <= stopped] + [min(t for t in points if t > stopped)]
        gaps = [b - a for a, b in zip(points, points[1:]) if a < until]
        out.append({**f, "injected_seconds": round(max(gaps), 3) if gaps else None})
    return out


def p50_max(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    return (round(statistics.median(values), 1), round(max(values), 1)) if values else (None, None)


def finite_weights(run: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    tensors = load_file(run / "export" / "model.safetensors")
    return bool(tensors) and all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def figures(out: Path, faults: list[dict], markers: dict, batch: int, epoch_size: int, wall: float,
            first_fault: float | None, stopped: float = float("inf")) -> dict:
    run = out / "run"
    records, events = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "events.jsonl")
    completed = any(e.get("event") == "final" for e in events)
    segs = segments_from_run(run, markers)
    if segs and not completed:     # unfinished: what is committed ends at the last checkpoint
        segs[-1].last_step = max(segs[-1].saved, default=segs[-1].start_step)
    acct = account(segs, batch, epoch_size)
    rec = recovery_seconds(faults, records, stopped)
    # undisturbed step time: rank 0's windows before the first fault, past the slow first steps
    calm = [r["step_seconds"] for r in records if r.get("event") is None and r.get("rank") == 0 and r["step"] > 5
            and (first_fault is None or r["time"] < first_fault)]
    step_s = statistics.median(calm) if calm else None
    undisturbed = undisturbed_run(records, events, first_fault)
    summaries = [e for e in events if e.get("event") == "summary"]
    kinds = {k: sum(1 for f in faults if f["kind"] == k) for k in FAULTS}
    return {
        "faults": len(faults), "by_kind": kinds,
        "recovery_run_p50_max": p50_max([e["seconds"] for e in events if e.get("event") == "recovered"]),
        "recovered_events": [{k: e.get(k) for k in ("seconds", "cause", "step", "attempt")}
                             for e in events if e.get("event") == "recovered"],
        "recovery_injected_p50_max": p50_max([r["injected_seconds"] for r in rec]),
        "goodput_run": summaries[-1]["goodput"] if summaries else None,
        "goodput_own": None if not step_s else round(min(1.0, acct["final_step"] * step_s / wall), 3),
        "goodput_undisturbed": None if undisturbed is None else round(
            min(1.0, (undisturbed["startup_seconds"] + acct["final_step"] * undisturbed["step_seconds"]) / wall), 3),
        "undisturbed": undisturbed,
        "undisturbed_step_seconds": step_s, "wall_seconds": round(wall, 1),
        "steps": acct["final_step"], "seen_twice": acct["seen_twice"], "lost": acct["lost"],
        "doubled_steps": acct["doubled_steps"], "resumed_wrong": acct["resumed_wrong"],
        "epochs": acct["epochs"], "lineage": acct["lineage"],
        "finite_weights": (run / "export" / "model.safetensors").exists() and finite_weights(run),
        "completed": completed, "stopped": stopped,
        "recoveries": rec,
    }


def undisturbed_run(records: list[dict], events: list[dict], first_fault: float | None) -> dict | None:
    """The issue's goodput is "the undisturbed run's time for the steps done / the wall time". The
    run before the first fault is that undisturbed run: its start-up (the first attempt's driver
    start to the start of step 1) and its mean step time (rank 0's first to last record before the
    fault: checkpoints, logging and the machine's noise included, unlike the median window). None
    without two such records."""
    starts = [e["time"] for e in events if e.get("event") == "attempt"]
    calm = sorted((r["step"], r["time"]) for r in records if r.get("event") is None and r.get("rank") == 0
                  and (first_fault is None or r["time"] < first_fault))
    if not starts or len(calm) < 2 or calm[-1][0] == calm[0][0]:
        return None
    (s_a, t_a), (s_b, t_b) = calm[0], calm[-1]
    step = (t_b - t_a) / (s_b - s_a)
    return {"startup_seconds": round(max(0.0, t_a - starts[0] - s_a * step), 2), "step_seconds": round(step, 6),
            "steps": s_b - s_a}


def table_row(f: dict, minutes: float, every: float, seed: int) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in f["by_kind"].items() if n)
    r50, rmax = f["recovery_injected_p50_max"]
    q50, qmax = f["recovery_run_p50_max"]
    return (f"| {time.strftime('%Y-%m-%d')} | {minutes:g} min, 1 per {every:g} s, seed {seed}, load {f['load'][0]:.1f} "
            f"| {f['faults']} ({kinds}) "
            f"| {r50} / {rmax} | {q50} / {qmax} | {f['goodput_run']} / {f['goodput_own']} / {f.get('goodput_undisturbed')} | {f['steps']} "
            f"| {f['seen_twice']} | {f['lost']} | {len(f['resumed_wrong'])} | {'yes' if f['finite_weights'] else 'NO'} |")


SECTION = """
## Chaos run

`python benchmarks/chaos.py --minutes 10 --fault-every 90 --seed 1 --out runs/chaos --docs`: a
`debug` run with `workers=1-2` on two Ray nodes of this machine (tests/cluster.py, 1 CPU each), its
shards on a local S3 server (moto) behind a TCP proxy, the run directory local. From its first step,
every ~90 s (x 0.7-1.3, seeded) one fault drawn (seeded) from: SIGKILL of a training worker; the
second node lost (SIGKILL of its processes) and added back 5 s later; SIGTERM to the driver; the S3
endpoint resetting every connection for 20 s; SIGTERM to every process of the second node, SIGKILL
2 s later, added back. Whenever the driver exits, the same command runs again (5 s later unless it
was preempted). At the end the driver gets a SIGTERM and the command is rerun with the step counts
cut a few steps past the stop, so that the run completes and exports. `--figures-only` recomputes
the figures of a finished run. Goals on this machine ({cpu}): recovery p50 <= 20 s, goodput >= 0.7,
samples seen twice = lost = 0.

Columns: **recovery** p50 / max in seconds: per fault the longest pause in rank 0's step records
that began between its injection and the next fault (to the first step of the group or rerun that
recovered: restart, reload, any wait for workers; a fault that did not stop training costs about a
step), then over the run's own `recovered` events (each restart or resuming rerun, dated from the
last record before it); **goodput**: the run's last `summary` (steps x median step / wall since the
first attempt) / ours (steps x the median step time before the first fault / the harness's wall
time, set-up excluded) / the issue's definition (the undisturbed run's time for the steps done /
the same wall time: the run before the first fault is that undisturbed run, its start-up plus the
steps done x its mean step time, checkpoints and logging included); **seen twice**, **lost**: samples of the committed lineage (`account()` in
the script: walking back from the last worker group, each resumed from a checkpoint an earlier
group saved; each committed step draws the next `data.batch_size` positions of the global sample
stream from the position its checkpoint recorded: `data_position`, x `world_size` before the global
order); **resumed wrong**: resumes at another position than their lineage had reached, from a step
no earlier group saved, or checkpoints recording another position than their lineage's; **finite**:
every tensor of the exported student.

| date | run | faults | recovery, injected (s) | recovery, run (s) | goodput run / ours / undisturbed | steps | seen twice | lost | resumed wrong | finite |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def append_to_docs(row: str, cpu: str) -> None:
    """The row at the end of the "Chaos run" section's table (the section made at the first call)."""
    path = ROOT / "docs" / "reliability.md"
    text = path.read_text()
    if "\n## Chaos run\n" not in text:
        text = text.rstrip("\n") + "\n" + SECTION.format(cpu=cpu)
    head, _, tail = text.partition("\n## Chaos run\n")
    table_end = tail.rfind("\n|") + 1
    line_end = tail.index("\n", table_end) + 1 if "\n" in tail[table_end:] else len(tail)
    tail = tail[:line_end].rstrip("\n") + "\n" + row + "\n" + tail[line_end:]
    path.write_text(head + "\n## Chaos run\n" + tail)


# --------------------------------------------------------------------------- the chaos harness

class Chaos:
    """The S3 server, the cluster, the driver (rerun whenever it exits) and the fault thread."""

    def __init__(self, out: Path, minutes: float, every: float, seed: int, steps: int, train: int):
        sys.path.insert(0, str(ROOT / "tests"))
        self.out, self.run = out, out / "run"
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.minutes = minutes
        self.deadline = float("inf")         # set once the run has made its first step
        self.every, self.rng = every, random.Random(seed)
        self.steps, self.train = steps, train
        self.faults: list[dict] = []
        self.markers: dict[int, list[dict]] = {}
        self.exits: list[dict] = []
        self.driver: subprocess.Popen | None = None
        self.stop = threading.Event()        # no more faults; the driver is (being) stopped
        self.done = threading.Event()        # the harness is over
        self.stopped = float("inf")          # when the deadline stopped the run
        self.lock = threading.Lock()         # launching a driver vs. stopping it at the deadline

    # -- set-up
    def __enter__(self):
        from conftest import TcpProxy, aws_env, start_moto
        from cluster import TwoNodeCluster
        self.moto, endpoint = start_moto(self.work / "moto.log")
        self.proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
        self._upload_shards(endpoint)
        # every process of the run (both nodes, the driver) reaches S3 through the proxy only
        os.environ.update(aws_env(f"http://127.0.0.1:{self.proxy.port}"), OMP_NUM_THREADS="1",
                          RAY_memory_monitor_refresh_ms="0")
        self.cluster = TwoNodeCluster(self.work).__enter__()
        return self

    def __exit__(self, *exc):
        from conftest import stop
        self.stop.set()
        self.done.set()
        if self.driver is not None and self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGKILL)
        self.cluster.__exit__(None, None, None)
        self.proxy.down()
        stop(self.moto)

    def _upload_shards(self, endpoint: str) -> None:
        import s3fs
        from sdn_dist.apps.synth.dataset import make_synth
        local = self.work / "shards"
        make_synth(out=str(local), train=self.train, test=16, size=32, per_shard=32, seed=3, progress=False)
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("chaos")
        fs.put(str(local) + "/", "chaos/shards/", recursive=True)

    # -- the driver
    def command(self, *extra: str) -> list[str]:
        sets = [f"out={self.run}", "data.train=s3://chaos/shards/train-*.tar", "data.test=s3://chaos/shards/test-*.tar",
                "workers=1-2", f"stage1.steps={self.steps // 4}", f"stage2.steps={self.steps - self.steps // 4}",
                "checkpoint.every=20", "checkpoint.keep=3", "ray.max_failures=100", *extra]
        return [sys.executable, "-m", "sdn_dist", "train", "--preset", "debug", "--quiet"] + [a for s in sets for a in ("--set", s)]

    def launch(self, *extra: str, finishing: bool = False) -> int | None:
        """Run the command to its exit; None (nothing run) once the deadline has stopped the run."""
        log = open(self.work / f"driver-{len(self.exits):02d}.log", "w")
        with self.lock:
            if self.stop.is_set() and not finishing:
                return None
            self.driver = subprocess.Popen(self.command(*extra), env=self.cluster.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        rc = self.driver.wait()
        self.exits.append({"rc": rc, "time": time.time(), "log": log.name})
        print(f"[chaos] driver exited {rc} ({log.name})", flush=True)
        return rc

    def scan_markers(self) -> None:
        """Keep every COMPLETE train state seen (checkpoint.keep prunes the files)."""
        for p in (self.run / "checkpoints").glob("step-*/COMPLETE"):
            try:
                m = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            have = self.markers.setdefault(int(m["step"]), [])
            if m not in have:
                have.append(m)

    def watch_markers(self) -> None:
        while not self.done.is_set():
            self.scan_markers()
            time.sleep(0.2)

    # -- faults
    def inject(self) -> None:
        """From the run's first step on, until the deadline: a fault every ~``every`` seconds."""
        while not self.stop.is_set() and not read_jsonl(self.run / "metrics.jsonl"):
            time.sleep(0.5)
        self.deadline = time.time() + 60 * self.minutes
        print(f"[chaos] {time.strftime('%H:%M:%S')} first step: faults for {self.minutes:g} min", flush=True)
        self._sleep_jittered()
        while not self.stop.is_set() and time.time() < self.deadline:
            kind = self.rng.choice(FAULTS)
            while not self.stop.is_set() and time.time() < self.deadline:
                f = {"kind": kind, "t0": time.time()}
                try:
                    f["detail"] = getattr(self, kind)()
                except Exception as e:  # noqa: BLE001 - nothing to hit yet (a group restarting): try again
                    print(f"[chaos] {kind}: not yet ({type(e).__name__}: {e})", flush=True)
                    self.stop.wait(2)
                    continue
                f["t1"] = time.time()
                print(f"[chaos] {time.strftime('%H:%M:%S')} {kind}: {f['detail']}", flush=True)
                self.faults.append(f)
                break
            self._sleep_jittered()

    def _sleep_jittered(self) -> None:
        self.stop.wait(self.every * self.rng.uniform(0.7, 1.3))

    def _live_worker_pids(self) -> dict[int, int]:
        import psutil
        recs = [r for r in read_jsonl(self.run / "metrics.jsonl") if r.get("event") is None]
        latest = {}
        for r in recs:
            if r["time"] > time.time() - 10:     # a group that is stepping, not one being torn down
                latest[r["rank"]] = r["pid"]
        return {rank: pid for rank, pid in latest.items() if psutil.pid_exists(pid)}

    def worker_sigkill(self) -> str:
        pids = self._live_worker_pids()
        if not pids:
            raise RuntimeError("no live training worker")
        rank = self.rng.choice(sorted(pids))
        os.kill(pids[rank], signal.SIGKILL)
        return f"rank {rank} pid {pids[rank]}"

    def node_bounce(self) -> str:
        n = self.cluster.kill_node2()
        time.sleep(5)
        self.cluster.add_node2()
        return f"{n} processes SIGKILLed, node added back"

    def node_sigterm_sigkill(self) -> str:
        n = self.cluster.term_node2(grace=2.0)
        time.sleep(3)
        self.cluster.add_node2()
        return f"{n} processes SIGTERMed, SIGKILL 2 s later, node added back"

    def driver_sigterm(self) -> str:
        if self.driver is None or self.driver.poll() is not None:
            raise RuntimeError("no driver running")
        os.kill(self.driver.pid, signal.SIGTERM)
        return f"pid {self.driver.pid}"

    def s3_outage(self) -> str:
        self.proxy.down(keep_port=True)
        time.sleep(OUTAGE_SECONDS)
        self.proxy.up()
        return f"{OUTAGE_SECONDS:g} s"

    # -- the whole run
    def go(self) -> float:
        t0 = time.time()
        threading.Thread(target=self.watch_markers, daemon=True).start()
        injector = threading.Thread(target=self.inject, daemon=True)
        injector.start()
        ender = threading.Thread(target=self._end_at_deadline, args=(injector,), daemon=True)
        ender.start()
        unexpected = 0
        while True:
            rc = self.launch()
            if rc == 0 or self.stop.is_set():
                break
            if rc != EXIT_PREEMPTED and not self._driver_fault_just_now():
                unexpected += 1
                if unexpected > 20:
                    raise RuntimeError(f"the driver failed {unexpected} times on its own: {self.exits}")
                self.stop.wait(5)       # as a RayJob's retry would, not in a tight loop
        for _ in range(3):        # stopped at the deadline: finish a few steps past the last checkpoint
            if rc == 0:
                break
            self.scan_markers()
            rc = self.launch(*self._finish_sets(), finishing=True)
        self.stop.set()
        self.done.set()
        self.scan_markers()
        return time.time() - t0

    def _driver_fault_just_now(self) -> bool:
        return bool(self.faults) and self.faults[-1]["kind"] == "driver_sigterm" and time.time() - self.faults[-1]["t0"] < 120

    def _end_at_deadline(self, injector: threading.Thread) -> None:
        while time.time() < self.deadline and not self.stop.is_set():
            time.sleep(1)
        injector.join()                 # a fault in flight ends first (the node back, S3 up)
        with self.lock:
            self.stop.set()
            self.stopped = time.time()
            if self.driver is not None and self.driver.poll() is None:
                print("[chaos] time is up: SIGTERM to the driver", flush=True)
                os.kill(self.driver.pid, signal.SIGTERM)

    def _finish_sets(self) -> list[str]:
        last = max(self.markers)
        state = self.markers[last][-1]
        switch = int(state["schedule"]["switch_step"])
        if last < switch:
            return [f"stage1.steps={last + 3}", "stage2.steps=3"]
        return [f"stage2.steps={last - switch + 3}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fault-every", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/chaos"))
    ap.add_argument("--steps", type=int, default=100000, help="planned steps (both stages); the run is cut at --minutes")
    ap.add_argument("--train-samples", type=int, default=64, help="samples per epoch (synthetic shards of 32)")
    ap.add_argument("--docs", action="store_true", help="append the row to docs/reliability.md")
    ap.add_argument("--figures-only", action="store_true", help="recompute the figures of the run in --out")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if args.figures_only:
        old = json.loads((out / "chaos.json").read_text())
        markers = {int(k): v for k, v in json.loads((out / "markers.json").read_text()).items()}
        faults = [{k: v for k, v in r.items() if k in ("kind", "t0", "t1", "detail")} for r in old["recoveries"]]
        f = figures(out, faults, markers, batch=8, epoch_size=args.train_samples, wall=old["wall_seconds"],
                    first_fault=faults[0]["t0"] if faults else None, stopped=old.get("stopped", float("inf")))
        return report(f, old, args)
    if (out / "run").exists():
        ap.error(f"{out}/run exists: give a fresh --out")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that the cluster and S3 server are stopped
    with Chaos(out, args.minutes, args.fault_every, args.seed, args.steps, args.train_samples) as chaos:
        wall = chaos.go()
        (out / "markers.json").write_text(json.dumps(chaos.markers))   # to recompute the figures offline
        (out / "chaos.json").write_text(json.dumps({"recoveries": chaos.faults, "wall_seconds": wall, "stopped": chaos.stopped}))
        f = figures(out, chaos.faults, chaos.markers, batch=8, epoch_size=args.train_samples, wall=wall,
                    first_fault=chaos.faults[0]["t0"] if chaos.faults else None, stopped=chaos.stopped)
    return report(f, {"exits": chaos.exits, "cpu": cpu_model(), "load": os.getloadavg(), "command": " ".join(sys.argv)}, args)


def report(f: dict, run: dict, args) -> int:
    """chaos.json, the markdown row (and docs/reliability.md with --docs); 0 when the run met its
    correctness goals."""
    f.update({k: run[k] for k in ("exits", "cpu", "load", "command") if k in run})
    (args.out.resolve() / "chaos.json").write_text(json.dumps(f, indent=1, default=str))
    row = table_row(f, args.minutes, args.fault_every, args.seed)
    print(row)
    if args.docs:
        append_to_docs(row, f["cpu"])
    ok = f["seen_twice"] == 0 and f["lost"] == 0 and not f["resumed_wrong"] and f["finite_weights"] and f["completed"]
    return 0 if ok else 1


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
        cpus = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("CPU(s)"))
        return f"{name}, {cpus} CPUs"
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
