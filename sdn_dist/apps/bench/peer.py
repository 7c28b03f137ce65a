"""The benchmark's data-parallel peers: the same training step in N plain processes, no Ray.

``sdn-dist bench`` measures `sdn-dist train` with 2 workers against a plain
``torch.nn.parallel.DistributedDataParallel`` loop of the same step (``kind="ddp"``): 2 processes
started with ``torch.multiprocessing`` on 127.0.0.1, gloo on CPUs (nccl on GPUs), 1 thread each,
the trainer's ``distill_step`` on the same per-rank micro-batch (rank r takes its slice of each
global batch, as the trainer's readers give it), the batches held in memory, torch Adam.
``kind="deepspeed"`` runs the trainer's own DeepSpeed engine (``loop.build_engine``, so the
``deepspeed.*`` options apply) in the same harness: what the engine costs apart from Ray and the
reader actors (docs/performance.md, "Where the 2-worker step goes"). ``kind="independent"`` is
the DDP loop without the gradient all-reduce: each process trains its own copy on its micro-batch.
It does no data-parallel training at all; it measures what the machine itself gives N processes at
that micro-batch, the ceiling any data-parallel layout can reach here.
"""

from __future__ import annotations

import argparse
import json
import sys
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdn_dist.config import Config, load_config
from sdn_dist.model.losses import stages
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import build_teacher
from sdn_dist.net import free_port
from sdn_dist.training.export import param_digest
from sdn_dist.training.loop import (build_engine, distill_step, prepare_batch, prepare_student, prepare_teacher,
                                    with_resolved_autocast)


def build_models(cfg, text_dim: int, seed: int = 0):
    """(teacher, student) as the trainer's step runs them; here, not in bench.py, which imports
    this module (the peers and bench's plain loops share it)."""
    torch.manual_seed(seed)
    teacher = build_teacher(cfg.model, cfg.teacher)
    student = Student(cfg.model, text_dim)
    return prepare_teacher(teacher), prepare_student(student)


def _rank_main(rank: int, world: int, port: int, kind: str, cfg_json: dict, batches, stage: int,
               steps: int, warmup: int, chunk: int, out_dir: str, use_gpu: bool) -> None:
    # 1 thread, as the trainer's workers (threads_per_worker); set before any torch work.
    torch.set_num_threads(cfg_json["threads_per_worker"])
    cfg = Config.model_validate(cfg_json)
    device = torch.device(f"cuda:{rank}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    cfg, _ = with_resolved_autocast(cfg, device)     # autocast=auto: bf16 where the device has it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    stage_cfg = stages(cfg.stage1, cfg.stage2)[stage - 1].config
    text_dim = batches[0][1].shape[1]
    teacher, student = build_models(cfg, text_dim, cfg.seed)
    teacher = teacher.to(device)
    if kind in ("ddp", "independent"):
        student = student.to(device)
        model = (torch.nn.parallel.DistributedDataParallel(student, device_ids=[rank] if use_gpu else None)
                 if kind == "ddp" else student)
        opt_cls = torch.optim.AdamW if stage_cfg.weight_decay > 0 else torch.optim.Adam
        opt = opt_cls(model.parameters(), lr=stage_cfg.lr, betas=stage_cfg.betas,
                      weight_decay=stage_cfg.weight_decay)
    elif kind == "deepspeed":
        # The same statistics as the plain loops' students (identity): the peers compare speed.
        model = build_engine(cfg, stage_cfg, text_dim, device, {"mean": [0.0] * text_dim, "std": 1.0})
    else:
        raise ValueError(f"unknown peer kind {kind!r}")
    micro = batches[0][0].shape[0] // world
    batch = batches[0][0].shape[0]

    def step(i: int) -> torch.Tensor:
        image, text = batches[i % len(batches)]
        image, text = image[rank * micro:(rank + 1) * micro], text[rank * micro:(rank + 1) * micro]
        real, text = prepare_batch(image, text, device, torch.float32)
        loss, _ = distill_step(teacher, model, real, text, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
        if kind != "deepspeed":
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            model.backward(loss)
            model.step()
        return loss.detach()

    losses = [float(step(i)) for i in range(warmup)]
    # Timed in chunks as the trainer's logging windows: the chunk's losses are read back (a host
    # sync, as the trainer's log step) before its clock stops.
    chunks, step_seconds = [], []
    for c0 in range(warmup, warmup + steps, chunk):
        t = time.perf_counter()
        out = [step(i) for i in range(c0, min(c0 + chunk, warmup + steps))]
        losses += torch.stack(out).tolist()
        dt = time.perf_counter() - t
        chunks.append(batch * len(out) / dt)
        step_seconds += [dt / len(out)] * len(out)
    weights = {k: v.detach().float().cpu() for k, v in getattr(model, "module", model).state_dict().items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "step_seconds": step_seconds, "chunk_samples_per_sec": chunks, "losses": losses,
        "param_sha256": param_digest(weights)}))
    dist.barrier()
    dist.destroy_process_group()


def run_peer(kind: str, cfg, batches, stage: int, steps: int, world: int = 2, warmup: int = 3,
             chunk: int = 5) -> dict:
    """``world`` processes (torch.multiprocessing, 127.0.0.1) training ``stage`` for ``steps``
    timed steps on the in-memory global ``batches`` -> samples/s (all ranks; the median chunk of
    rank 0, as the trainer's median window) and every step's loss on rank 0."""
    cfg = cfg.model_copy(deep=True)
    cfg.workers = world
    cfg = type(cfg).model_validate(cfg.model_dump())
    use_gpu = bool(cfg.use_gpu and torch.cuda.is_available() and torch.cuda.device_count() >= world)
    with tempfile.TemporaryDirectory(prefix="sdn-peer-") as d:
        t = time.perf_counter()
        mp.spawn(_rank_main, args=(world, free_port(), kind, cfg.model_dump(mode="json"), batches, stage,
                                   steps, warmup, chunk, d, use_gpu), nprocs=world, join=True)
        wall = time.perf_counter() - t
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    batch = batches[0][0].shape[0]
    return {"kind": kind, "stage": stage, "world": world, "micro_batch": batch // world,
            "backend": "nccl" if use_gpu else "gloo", "steps": steps,
            "samples_per_sec": statistics.median(r0["chunk_samples_per_sec"]),
            "chunk_samples_per_sec": r0["chunk_samples_per_sec"],
            "mean_samples_per_sec": batch * len(r0["step_seconds"]) / sum(r0["step_seconds"]),
            "step_seconds_median": statistics.median(r0["step_seconds"]),
            "losses": r0["losses"], "param_sha256": [r["param_sha256"] for r in ranks], "wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    """The peers on their own (benchmarks/gpu.sh runs them on the GPUs after gpu_bench.py):
    random in-memory batches at the preset's size, one JSON line per kind and stage."""
    ap = argparse.ArgumentParser(prog="python -m sdn_dist.apps.bench.peer", description=main.__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, metavar="FILE.json")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--kinds", default="ddp,deepspeed")
    ap.add_argument("--world", type=int, default=0, help="processes (default: the GPUs, else 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    world = a.world or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    cfg = load_config(a.preset, overrides=["teacher.weights=random", f"workers={world}"] + a.set)
    torch.manual_seed(0)
    s, n = cfg.model.image_size, cfg.data.batch_size
    batches = [(torch.rand(n, 3, s, s), torch.randn(n, cfg.text.dim)) for _ in range(4)]
    res = {"preset": a.preset, "world": world, "batch": n, "overrides": a.set, "runs": []}
    for kind in a.kinds.split(","):
        for stage in (1, 2):
            r = run_peer(kind, cfg, batches, stage, a.steps, world, a.warmup, chunk=a.steps)
            res["runs"].append(r)
            print(json.dumps({k: r[k] for k in ("kind", "stage", "world", "backend", "micro_batch", "samples_per_sec")}),
                  flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")   # after each: a timeout keeps what ran
    return 0


if __name__ == "__main__":
    sys.exit(main())
