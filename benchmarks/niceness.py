#!/usr/bin/env python3
"""What Ray's worker niceness costs a training run on a shared machine (A/B inside one run).

    python benchmarks/niceness.py --shards DIR [--workers 1] [--seconds 240] [--flip 12] [--out nice.json]

Starts one `sdn-dist train` (demo preset, text hash/384 as `sdn-dist bench` uses, teacher random)
and, while it trains, flips the niceness of every thread of its training workers and shard
readers between 15 (where Ray puts worker processes) and 0 (the driver's) every ``--flip``
seconds. Each logging window of metrics.jsonl is credited to the niceness it ran under (windows
that straddle a flip are dropped), so both settings see the same data, stage mix and machine
load. Needs the right to lower niceness (root or CAP_SYS_NICE). DIR: shards as `sdn-dist bench`
makes them (``python -m sdn_dist.apps.bench.bench --tiny --workdir W`` leaves debug-size ones in W/shards;
use ``--workdir`` with ``--quick`` for demo-size ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def set_nice(pid: int, value: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except (ProcessLookupError, PermissionError):
            pass


def run_processes(driver: psutil.Process) -> list[int]:
    out = []
    for p in driver.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith(("ray::RayTrainWorker", "ray::ShardReader")):
            out.append(p.pid)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=240, help="training time to alternate over")
    ap.add_argument("--flip", type=float, default=12, help="seconds per niceness setting")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="sdn-nice-"))
    steps = 100000
    cmd = [sys.executable, "-m", "sdn_dist.cli", "train", "--preset", "demo", "--quiet",
           "--set", f"out={out}", "--set", f"data.train={a.shards}/train-*.tar", "--set", f"data.test={a.shards}/test-*.tar",
           "--set", f"workers={a.workers}", "--set", "text.encoder=hash", "--set", "text.dim=384",
           "--set", "teacher.weights=random", "--set", f"stage1.steps={steps}", "--set", "stage2.steps=1",
           "--set", "metrics.log_every=5", "--set", f"checkpoint.every={steps}", "--set", "samples.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)
    flips: list[tuple[float, int]] = []
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):   # past start-up
            if proc.poll() is not None:
                raise SystemExit("the training run ended before its first windows")
            time.sleep(1)
        t_end, nice, seen = time.time() + a.seconds, 0, {}
        while time.time() < t_end:
            for pid in run_processes(driver):
                seen[pid] = " ".join(psutil.Process(pid).cmdline())[:40]
                set_nice(pid, nice)
            flips.append((time.time(), nice))
            time.sleep(a.flip)
            nice = 15 if nice == 0 else 0
        flips.append((time.time(), -1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    by = {0: [], 15: []}
    for r in recs:
        if r.get("rank", 0) != 0 or "step_seconds" not in r:
            continue
        start = r["time"] - r["step_seconds"] * r["window_steps"]
        for (t0, n), (t1, _) in zip(flips, flips[1:]):
            if t0 <= start and r["time"] <= t1 and n in by:
                by[n].append(r["samples_per_sec"])
    res = {"command": "python benchmarks/niceness.py " + " ".join(argv or sys.argv[1:]), "workers": a.workers,
           "processes": seen, "windows": {str(k): len(v) for k, v in by.items()},
           "samples_per_sec_median": {str(k): statistics.median(v) if v else None for k, v in by.items()},
           "samples_per_sec": {str(k): [round(x, 1) for x in v] for k, v in by.items()},
           "load_average": list(os.getloadavg())}
    if by[0] and by[15]:
        res["nice0_over_nice15"] = statistics.median(by[0]) / statistics.median(by[15])
    print(json.dumps({k: v for k, v in res.items() if k != "samples_per_sec"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
