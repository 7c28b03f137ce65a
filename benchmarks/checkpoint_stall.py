"""Training time lost per checkpoint: local disk vs S3, blocking vs background upload.

    python benchmarks/checkpoint_stall.py [--preset demo] [--steps 40] [--every 10] [--repeats 2] [--out FILE.json]

One process, one DeepSpeed engine around the preset's student (real optimizer state, so the
checkpoint is the size a worker writes), trained with real steps; sdn_dist's Checkpointer saves
every ``--every`` steps to (a) a local directory, (b) S3 with checkpoint.background=false,
(c) S3 with the upload in the background. The S3 server is moto's server mode on 127.0.0.1,
reached through the standard AWS environment, as in the tests: a fast, local object store, so the
upload times here are a lower bound for a real one. Lost per checkpoint = (wall time of the run
with checkpoints - the same run without) / checkpoints, the upload of the last one excluded
(checkpoints at every ``--every`` steps before the end). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return proc


def build(preset: str):
    import deepspeed
    import torch

    from sdn_dist.config import load_config
    from sdn_dist.model.student import Student
    from sdn_dist.training.loop import deepspeed_config
    cfg = load_config(preset, overrides=["workers=1", "deepspeed.grad_accum=1", "data.batch_size=4"])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.manual_seed(0)
    student = Student(cfg.model, 384)
    engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                      config=deepspeed_config(cfg, cfg.stage1))
    text = torch.randn(cfg.micro_batch, 384)
    return cfg, engine, text


def step(engine, text) -> None:
    out = engine(text)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    engine.backward(loss)
    engine.step()


def run(engine, text, steps: int, every: int, out: str | None, background: bool) -> dict:
    from sdn_dist.config import CheckpointConfig
    from sdn_dist.training.checkpoint import Checkpointer
    records: list[dict] = []
    ck = None
    if out:
        ck = Checkpointer(out, keep=2, cfg=CheckpointConfig(keep=2, background=background), report=records.extend)
    t0 = time.perf_counter()
    saves = 0
    for i in range(1, steps + 1):
        step(engine, text)
        if ck is not None and i % every == 0 and i < steps:
            ck.save(engine, i, {"train": {"stage": 1}})
            saves += 1
    train = time.perf_counter() - t0
    t1 = time.perf_counter()
    if ck is not None:
        ck.finish()   # the last upload, if still going: not training time, reported apart
    done = [r for r in records if r["event"] == "checkpoint"]
    ups = [r for r in records if r["event"] == "checkpoint_upload"]
    return {"train_seconds": train, "tail_wait_seconds": time.perf_counter() - t1, "checkpoints": saves,
            "blocked_seconds": [r["blocked_seconds"] for r in done],
            "upload_seconds": [r["upload_seconds"] for r in ups]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    moto = start_moto()
    try:
        import s3fs
        s3fs.S3FileSystem().mkdir("bench")
        cfg, engine, text = build(args.preset)
        for _ in range(3):
            step(engine, text)   # warm-up
        local = tempfile.mkdtemp(prefix="sdn-ckpt-bench-")
        modes = {"none": (None, False), "local": (local, False),
                 "s3-blocking": ("s3://bench/blocking", False), "s3-background": ("s3://bench/background", True)}
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.repeats):          # interleaved, so load drifts hit every mode alike
            for m, (out, bg) in modes.items():
                results[m].append(run(engine, text, args.steps, args.every, out and f"{out}-{r}", bg))
        kept = os.path.join(f"{local}-0", "checkpoints")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(kept) for f in fs) / max(1, len(os.listdir(kept)))
    finally:
        os.killpg(moto.pid, 15)

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0
    base = mean([x["train_seconds"] for x in results["none"]])
    rows = []
    for m in modes:
        if m == "none":
            continue
        xs = results[m]
        n = xs[0]["checkpoints"]
        lost = (mean([x["train_seconds"] for x in xs]) - base) / n
        rows.append({"mode": m, "lost_per_checkpoint_s": lost,
                     "blocked_per_checkpoint_s": mean([b for x in xs for b in x["blocked_seconds"]]),
                     "upload_s": mean([u for x in xs for u in x["upload_seconds"]]),
                     "tail_wait_s": mean([x["tail_wait_seconds"] for x in xs])})
    report = {"preset": args.preset, "steps": args.steps, "every": args.every, "repeats": args.repeats,
              "checkpoint_bytes": size, "step_seconds": base / args.steps, "rows": rows, "raw": results,
              "cpu": platform.processor() or platform.machine(), "loadavg": open("/proc/loadavg").read().split()[:3],
              "torch": torch.__version__}
    print(f"checkpoint {size / 1e6:.1f} MB, step {base / args.steps * 1000:.0f} ms, load {' '.join(report['loadavg'])}")
    print("| out | training time lost per checkpoint (s) | training held by save() (s) | upload (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['lost_per_checkpoint_s']:.2f} | {r['blocked_per_checkpoint_s']:.2f} | {r['upload_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
