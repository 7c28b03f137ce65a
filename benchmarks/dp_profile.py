"""Where the 2-worker step goes: CPU time of every process of a `sdn-dist train` run, by role.

    python benchmarks/dp_profile.py --out prof.json [--steps 40] [--set deepspeed.KEY=VALUE ...]
    python benchmarks/dp_profile.py --out prof.json --py-spy DIR    # + a py-spy flame graph of each worker

Runs the bench's 2 workers x 1 thread `sdn-dist train` (demo preset, synthetic shards, the bench's
`hash` text encoder) while a sampler reads /proc every 0.25 s: the CPU seconds (user + system) of
every process descended from this one (Ray's gcs_server, raylet, agents, the training workers, the
reader actors, this driver), each attributed to its role by its process title (Ray names workers
``ray::ClassName``). Only the steady part counts: from the end of each rank-0 stage's first
logging window to the end of the stage (the switch, with its checkpoint and engine rebuild, is
left out). The JSON gives each role's share of the steady wall time x cores, its CPU microseconds
per sample trained (less distorted by other jobs' load), the samples/s and data_wait_fraction;
docs/performance.md ("Where the 2-worker step goes") has the reading.
With --py-spy, ``py-spy record`` samples each training worker (native frames included) for the
stage-1 steady part and writes a speedscope JSON per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TICK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def role(pid: int, root: int) -> str:
    if pid == root:
        return "driver (bench process: Ray Train controller client, coordinator calls)"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        # Ray's setproctitle can leave cmdline blank while a task runs; the kernel's comm keeps
        # the first 15 characters of the title (ray::RayTrainW, ray::ShardReade)
        cmd = cmd or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    for key, name in (("RayTrainW", "training worker"), ("ShardReade", "reader actor"),
                      ("TrainController", "Ray Train controller"), ("Coordinator", "coordinator actor"),
                      ("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent", "dashboard agent"),
                      ("DashboardAgent", "dashboard agent"), ("runtime_env", "runtime-env agent"),
                      ("RuntimeEnv", "runtime-env agent"), ("log_monitor", "log monitor"), ("ray::IDLE", "idle Ray worker")):
        if key in cmd:
            return name
    return "other: " + cmd[:60]


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


class Sampler(threading.Thread):
    """(time, {pid: (role, cpu seconds)}) every ``period`` seconds."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()
        self.roles: dict[int, str] = {}
        self.root = os.getpid()

    def run(self) -> None:
        while not self.stop.is_set():
            snap = {}
            for pid in descendants(self.root):
                c = cpu_seconds(pid)
                if c is None:
                    continue
                r = role(pid, self.root)
                if r != "idle Ray worker" or pid not in self.roles:   # a worker's title changes once it is used
                    self.roles[pid] = r
                snap[pid] = c
            self.samples.append((time.time(), snap))
            self.stop.wait(self.period)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between the samples nearest t0 and t1."""
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        out: dict[str, float] = {}
        for pid, c in b[1].items():
            d = c - a[1].get(pid, c if pid in a[1] else 0.0)
            if pid not in a[1]:
                d = c   # started inside the interval
            r = self.roles.get(pid, "?")
            out[r] = out.get(r, 0.0) + d
        out["_wall"] = b[0] - a[0]
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/sdn-dp-profile")
    ap.add_argument("--set", action="append", default=[], help="config overrides for the trainer")
    ap.add_argument("--py-spy", default="", help="directory for py-spy speedscope profiles of the workers")
    a = ap.parse_args(argv)

    from sdn_dist.apps.bench import bench
    from sdn_dist.config import load_config
    from sdn_dist.training.driver import init_ray

    work = Path(a.workdir)
    shards = work / "shards"
    windows = bench.Windows("profile", steps=a.steps, log_every=a.log_every)
    cfg = load_config(windows.preset, overrides=list(windows.overrides) + [
        f"data.train={shards}/train-*.tar", f"data.test={shards}/test-*.tar", "teacher.weights=random"] + a.set)
    if not shards.exists():
        bench.make_shards(shards, cfg, windows.n_train)
    init_ray(cfg)
    sampler = Sampler()
    sampler.start()
    spies: list[subprocess.Popen] = []
    if a.py_spy:
        Path(a.py_spy).mkdir(parents=True, exist_ok=True)

        def spy() -> None:   # attach to the workers once they run, for ~the stage-1 steady part
            deadline = time.time() + 120
            while time.time() < deadline:
                pids = [p for p, r in sampler.roles.items() if r == "training worker"]
                if len(pids) >= 2:
                    time.sleep(8)    # past start-up
                    for p in pids:
                        spies.append(subprocess.Popen(
                            [str(Path(sys.executable).parent / "py-spy"), "record", "--native", "-p", str(p), "-d", "15",
                             "-r", "200", "-f", "speedscope", "-o", str(Path(a.py_spy) / f"worker-{p}.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    return
                time.sleep(0.5)
        threading.Thread(target=spy, daemon=True).start()
    run = bench.train_run(cfg, work, 2, 1, windows)
    sampler.stop.set()
    sampler.join()
    for p in spies:
        p.wait(timeout=60)
    records = [json.loads(x) for x in (work / "run-2x1" / "metrics.jsonl").read_text().splitlines()]
    out = {"load_average": list(os.getloadavg()), "overrides": a.set, "samples_per_sec": {}, "cpu": {}}
    for stage in (1, 2):
        r0 = sorted((x for x in records if x.get("rank") == 0 and x.get("stage") == stage and "samples_per_sec" in x),
                    key=lambda x: x["step"])
        t0, t1 = r0[0]["time"], r0[-1]["time"]
        cpu = sampler.between(t0, t1)
        wall = cpu.pop("_wall")
        out["cpu"][f"stage{stage}"] = {"wall_seconds": wall, "core_seconds_available": wall * (os.cpu_count() or 1),
                                       "cpu_seconds": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
                                       "share_of_cores": {k: v / (wall * (os.cpu_count() or 1)) for k, v in
                                                          sorted(cpu.items(), key=lambda kv: -kv[1])}}
        out["samples_per_sec"][f"stage{stage}"] = run[f"stage{stage}"]["samples_per_sec"]
        # CPU per sample trained in the steady part: less distorted by other jobs' load than a share
        samples = (r0[-1]["step"] - r0[0]["step"]) * cfg.data.batch_size
        out["cpu"][f"stage{stage}"].update(samples=samples, us_per_sample={
            k: 1e6 * v / samples for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])} if samples else {},
            data_wait_fraction=run[f"stage{stage}"]["data_wait_fraction"])
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for stage in (1, 2):
        c = out["cpu"][f"stage{stage}"]
        print(f"stage {stage}: {out['samples_per_sec'][f'stage{stage}']:.1f} samples/s, {c['wall_seconds']:.1f} s steady, "
              f"{c['samples']} samples, data_wait_fraction {c['data_wait_fraction']:.3f}")
        for k, v in c["cpu_seconds"].items():
            print(f"  {k:40s} {v:7.2f} cpu-s  {100 * v / c['wall_seconds']:5.1f} % of one core"
                  f"  {c['us_per_sample'].get(k, 0.0):7.1f} us/sample")
    import ray
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
