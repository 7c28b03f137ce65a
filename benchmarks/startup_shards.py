"""Start-up of `sdn-dist train` on a bucket of many small shards: launch to the first logged step.

    python benchmarks/startup_shards.py --shards 1000 10000 [--no-index 1000] [--out FILE.json]

A local S3 server (moto's server mode on 127.0.0.1, reached through the standard AWS
environment, as the tests do) is filled with N small shards (copies of 8 synthetic shards of 2
samples at 32 px, ~10 KB each: the bytes do not matter to start-up, the object count does) and
their shard index (`sdn-dist shards index`, which counts every tar once: that time is the
count every start paid before indexes). Then `sdn-dist train --preset debug` (2 + 1 steps) runs
on `s3://.../train-*.tar` (after one untimed warm-up run); its time to first step = the `time` of the first step record in
metrics.jsonl - the launch. Alongside, in this process, the start-up phases that depend on the
shard count: the listing (`expand_urls`), the counts from the index (`count_shards`) and the
first epoch's plan. `--no-index N` also times a start without the index at those sizes.
Prints a Markdown table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_stall import start_moto  # noqa: E402 - the same local S3 server, same environment

DISTINCT, PER_SHARD = 8, 2


def cpu() -> str:
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    return f"{info.get('model name')} (family {info.get('cpu family')} model {info.get('model')}), {os.cpu_count()} cores"


def fill(fs, prefix: str, n: int, shards: list[bytes]) -> float:
    t = time.time()
    for lo in range(0, n, 5000):   # batches: s3fs sends each dict concurrently
        fs.pipe({f"{prefix}/train-{i:06d}.tar": shards[i % len(shards)] for i in range(lo, min(n, lo + 5000))})
    return time.time() - t


def sdn(*args: str, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess]:
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "sdn_dist", *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"sdn-dist {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.time() - t, p


def train(url: str, out: str) -> dict:
    launch = time.time()
    secs, p = sdn("train", "--preset", "debug", "--quiet", "--set", f"data.train={url}", "--set", f"out={out}",
                  "--set", "stage1.steps=2", "--set", "stage2.steps=1", "--set", "checkpoint.every=100",
                  "--set", "samples.count=1")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r.get("event") is None and "step" in r]
    return {"first_step_s": round(steps[0]["time"] - launch, 2), "whole_run_s": round(secs, 2),
            "stderr_notes": [l for l in p.stderr.splitlines() if "counted the samples" in l]}


def phases(url: str) -> dict:
    """The shard-count-dependent parts of the driver's start-up, timed in this process as
    DataSpec.build does them: one fresh listing, the expansion, the counts, the epoch plan."""
    import s3fs

    from sdn_dist.data import index
    from sdn_dist.data.pipeline import plan_epoch
    from sdn_dist.data.shards import expand_urls
    s3fs.S3FileSystem.clear_instance_cache()
    index._LISTED.clear()
    t0 = time.time()
    index.list_ahead(url)
    urls = expand_urls(url)
    t1 = time.time()
    counted = index.count_shards(urls)
    t2 = time.time()
    plan_epoch(counted.counts, 0, 0, True)
    t3 = time.time()
    return {"list_s": round(t1 - t0, 2), "counts_s": round(t2 - t1, 2), "plan_s": round(t3 - t2, 3),
            "counts_from": counted.sources()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--no-index", type=int, nargs="*", default=[], help="also start without the index at these sizes")
    ap.add_argument("--no-count", action="store_true",
                    help="skip timing `shards index` (it reads every tar: minutes at 10,000 on a busy machine); "
                         "the index is then written from the known counts of the copied shards")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    moto = start_moto()
    rows, warm = [], {}
    try:
        import s3fs

        from sdn_dist.apps.synth.dataset import make_synth
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        tmp = tempfile.mkdtemp(prefix="sdn-startup-bench-")
        make_synth(os.path.join(tmp, "src"), train=DISTINCT * PER_SHARD, test=0, size=32,
                   per_shard=PER_SHARD, seed=0, progress=False)
        shards = [open(os.path.join(tmp, "src", f"train-{i:06d}.tar"), "rb").read() for i in range(DISTINCT)]
        # One untimed run first: one-time costs (DeepSpeed building its CPU op for this venv's
        # path, cold caches) would otherwise land on whichever measured run came first.
        warm = train(os.path.join(tmp, "src"), os.path.join(tmp, "run-warmup"))
        print(f"warm-up run (8 local shards): first step after {warm['first_step_s']} s", flush=True)
        for n in args.shards:
            prefix = f"bench/n{n}"
            url = f"s3://{prefix}/train-*.tar"
            row = {"shards": n, "shard_bytes": len(shards[0]), "fill_s": round(fill(fs, prefix, n, shards), 1)}
            print(f"{n} shards: filled in {row['fill_s']} s", flush=True)
            if n in args.no_index:
                row["no_index"] = train(url, os.path.join(tmp, f"run-{n}-noindex"))
                print(f"  without an index: first step after {row['no_index']['first_step_s']} s", flush=True)
            if args.no_count:
                from sdn_dist.data.index import entry, stat_dir, write_index
                names = [f"train-{i:06d}.tar" for i in range(n)]
                listing = stat_dir(f"s3://{prefix}", names)
                write_index(f"s3://{prefix}", {m: entry(m, PER_SHARD, listing[m]) for m in names})
                row["index_s"] = None
            else:
                row["index_s"] = round(sdn("shards", "index", url)[0], 1)
                print(f"  `shards index` (reads every tar): {row['index_s']} s", flush=True)
            row["phases"] = phases(url)
            row["load_before_train"] = open("/proc/loadavg").read().split()[:3]   # the machine is shared
            row["indexed"] = train(url, os.path.join(tmp, f"run-{n}"))
            print(f"  with the index: first step after {row['indexed']['first_step_s']} s; phases {row['phases']}",
                  flush=True)
            rows.append(row)
    finally:
        os.killpg(moto.pid, 15)
    report = {"rows": rows, "warmup": warm, "cpu": cpu(), "loadavg": open("/proc/loadavg").read().split()[:3],
              "command": "python benchmarks/startup_shards.py " + " ".join(sys.argv[1:])}
    print(f"\n{report['cpu']}; load {' '.join(report['loadavg'])}")
    print("| shards | fill S3 (s) | `shards index`: count every tar (s) | list (s) | counts from the index (s) "
          "| epoch plan (s) | launch to first step, indexed (s) | launch to first step, no index (s) | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases"]
        noidx = r.get("no_index", {}).get("first_step_s", "")
        print(f"| {r['shards']:,} | {r['fill_s']} | {r['index_s']} | {ph['list_s']} | {ph['counts_s']} | "
              f"{ph['plan_s']} | {r['indexed']['first_step_s']} | {noidx} | {r['load_before_train'][0]} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
