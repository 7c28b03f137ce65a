"""Soak: a long `debug` training run, watching each worker's resident memory for growth.

    python benchmarks/soak.py --minutes 20 --out runs/soak [--workers 2]

Samples the RSS of every training-worker process (their pids come from metrics.jsonl) every
``--every`` seconds; growth is measured from the end of warm-up (``--warmup`` minutes) to the end,
on medians of the first and last five samples, so one allocator burst does not decide it.
Writes ``<out>/soak.json``; docs/reliability.md quotes the figure. Not a CI test (it takes 20 min).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="minutes before the baseline is taken")
    ap.add_argument("--every", type=float, default=15.0, help="seconds between RSS samples")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    if not (shards / "synth.json").exists():
        from sdn_dist.apps.synth.dataset import make_synth
        make_synth(out=str(shards), train=512, test=16, size=32, per_shard=128, seed=0, progress=False)
    run = out / "run"
    cmd = [sys.executable, "-m", "sdn_dist.cli", "train", "--preset", "debug", "--quiet",
           "--set", f"out={run}", "--set", f"data.train={shards}/train-*.tar",
           "--set", f"data.test={shards}/test-*.tar", "--set", f"workers={args.workers}",
           "--set", "stage1.steps=100000000", "--set", "stage2.steps=0",
           "--set", "checkpoint.every=500", "--set", "metrics.log_every=20"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(out / "soak.log", "w"))
    t0 = time.time()
    samples: dict[int, list[tuple[float, int]]] = {}
    last_step = 0
    try:
        while time.time() - t0 < args.minutes * 60:
            time.sleep(args.every)
            if proc.poll() is not None:
                raise SystemExit(f"training stopped early (exit {proc.returncode}); see {out / 'soak.log'}")
            metrics = run / "metrics.jsonl"
            if not metrics.exists():
                continue
            pids, steps = set(), []
            for line in metrics.read_text().splitlines()[-50:]:
                r = json.loads(line)
                pids.add(r["pid"])
                steps.append(r["step"])
            last_step = max(steps + [last_step])
            for pid in pids:
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                samples.setdefault(pid, []).append((time.time() - t0, rss))
            print(f"{(time.time() - t0) / 60:5.1f} min  step {last_step}  rss MiB "
                  + " ".join(f"{s[-1][1] / 2**20:.0f}" for s in samples.values()), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    result = {"minutes": args.minutes, "warmup_minutes": args.warmup, "steps": last_step,
              "workers": {}, "command": " ".join(sys.argv)}
    for pid, s in samples.items():
        after = [r for t, r in s if t >= args.warmup * 60]
        if len(after) < 10:
            continue
        base, end = statistics.median(after[:5]), statistics.median(after[-5:])
        result["workers"][str(pid)] = {"rss_start_mib": base / 2**20, "rss_end_mib": end / 2**20,
                                       "growth": (end - base) / base, "samples": len(s)}
    result["max_growth"] = max((w["growth"] for w in result["workers"].values()), default=None)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = result["max_growth"] is not None and result["max_growth"] < 0.05
    print("PASS: worker RSS grew < 5 % after warm-up" if ok else "FAIL: worker RSS grew >= 5 % (or too few samples)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
