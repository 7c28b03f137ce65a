#!/usr/bin/env python3
"""The paper preset on one GPU: samples/s per stage, memory and MFU, by precision and layout.

    bash benchmarks/gpu.sh [OUT_DIR]                  # the prepared run: one H100, < 5 minutes
    python benchmarks/gpu_bench.py --out gpu-bench.json [--budget 230]
    python benchmarks/gpu_bench.py --device cpu --preset debug --steps 2 --out /tmp/g.json   # smoke test

For each stage, one micro-batch of the paper's batch (12, at 224 px, full-width VGG19, 1024-d text)
goes through exactly the trainer's step (``sdn_dist.training.loop.distill_step``, backward, torch Adam as
DeepSpeed's ``torch_adam`` runs it) under:

* precision ``default`` (what `sdn-dist train` gets today: PyTorch's defaults, cuDNN convolutions in
  TF32, matmuls in fp32), ``fp32`` (TF32 off everywhere) and ``bf16`` (autocast, fp32 weights);
* memory layout NCHW or channels_last as the trainer sets it (``trainer.prepare_teacher`` /
  ``prepare_student``: NHWC activations).

Per configuration: samples/s, ms/step, peak GPU memory (torch.cuda.max_memory_allocated) split into
weights, gradients, Adam state and the rest (activations, workspaces), and MFU = model FLOPs of one
step (torch.utils.flop_counter) x steps/s / the dense matmul FLOP/s measured on this GPU in the same
precision (``mfu``), and / the nominal H100 SXM dense peak (``mfu_nominal``). Then the same step
through the DeepSpeed engine (``trainer.build_engine``, one process) when DeepSpeed is installed,
and a batch sweep of the fastest configuration. Results are written after every configuration, so
a run stopped by its time budget still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository, if not installed

NOMINAL_H100_SXM = {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12}   # dense, FLOP/s
PEAK_OF = {"default": "tf32", "fp32": "fp32", "bf16": "bf16"}               # the fitting ceiling


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def precision_mode(precision: str):
    """default: PyTorch's own (cuDNN TF32 on, matmul TF32 off); fp32: TF32 off; tf32/bf16: on."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    elif precision in ("tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_peak(dev: torch.device, precision: str, n: int, reps: int) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with precision_mode(precision):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            c = a @ b
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        sync(dev)
        dt = time.perf_counter() - t
    del a, b, c
    return 2 * n ** 3 * reps / dt


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build(cfg, dev, channels_last: bool):
    from sdn_dist.model.student import Student
    from sdn_dist.model.teacher import build_teacher
    torch.manual_seed(0)
    teacher = build_teacher(cfg.model, cfg.teacher).to(dev)
    student = Student(cfg.model, cfg.text.dim).to(dev)
    if channels_last:   # as the trainer lays them out
        from sdn_dist.training.loop import prepare_student, prepare_teacher
        teacher, student = prepare_teacher(teacher), prepare_student(student)
    return teacher, student


def inputs(cfg, dev, batch: int, channels_last: bool):
    s = cfg.model.image_size
    real = torch.rand(batch, 3, s, s, device=dev)
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    return real, torch.randn(batch, cfg.text.dim, device=dev)


def step_flops(cfg, dev, stage: int, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from sdn_dist.model.losses import stages
    from sdn_dist.training.loop import distill_step
    teacher, student = build(cfg, dev, False)
    real, text = inputs(cfg, dev, batch, False)
    with FlopCounterMode(display=False) as counter:
        loss, _ = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
        loss.backward()
    del teacher, student, loss
    return int(counter.get_total_flops())


def timed_steps(dev, steps: int, warmup: int, one_step) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t = time.perf_counter()
        one_step()
    sync(dev)
    return (time.perf_counter() - t) / steps


def reset_memory(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory(dev) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def run_plain(cfg, dev, stage: int, precision: str, channels_last: bool, batch: int, steps: int, warmup: int) -> dict:
    from sdn_dist.model.losses import stages
    from sdn_dist.training.loop import distill_step
    stage_cfg = stages(cfg.stage1, cfg.stage2)[stage - 1].config
    reset_memory(dev)
    teacher, student = build(cfg, dev, channels_last)
    opt = torch.optim.Adam(student.parameters(), lr=stage_cfg.lr, betas=stage_cfg.betas)
    real, text = inputs(cfg, dev, batch, channels_last)

    def one_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with precision_mode(precision):
        sec = timed_steps(dev, steps, warmup, one_step)
    peak = peak_memory(dev)
    mem = {"weights_bytes": tensor_bytes(student.parameters()),
           "grads_bytes": tensor_bytes(p.grad for p in student.parameters()),
           "adam_state_bytes": tensor_bytes(v for st in opt.state.values() for v in st.values()),
           "teacher_bytes": tensor_bytes(teacher.parameters()), "peak_bytes": peak}
    if peak is not None:
        mem["activations_and_workspace_bytes"] = peak - sum(v for k, v in mem.items() if k != "peak_bytes")
    return {"path": "plain", "stage": stage, "precision": precision, "channels_last": channels_last,
            "batch": batch, "step_seconds": sec, "samples_per_sec": batch / sec, "memory": mem}


def run_engine(cfg, dev, stage: int, batch: int, steps: int, warmup: int) -> dict:
    """The trainer's own engine (DeepSpeed, ZeRO per the preset, one process) and layout."""
    import deepspeed

    from sdn_dist.model.losses import stages
    from sdn_dist.training.loop import build_engine, distill_step, prepare_batch, prepare_teacher
    from sdn_dist.model.teacher import build_teacher
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    reset_memory(dev)
    cfg = cfg.model_copy(deep=True)
    cfg.data.batch_size = batch
    stage_cfg = stages(cfg.stage1, cfg.stage2)[stage - 1].config
    torch.manual_seed(0)
    teacher = prepare_teacher(build_teacher(cfg.model, cfg.teacher).to(dev))
    engine = build_engine(cfg, stage_cfg, cfg.text.dim, dev)
    real, text = inputs(cfg, dev, batch, False)
    real, text = prepare_batch(real, text, dev, next(engine.module.parameters()).dtype)

    def one_step():
        loss, _ = distill_step(teacher, engine, real, text, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
        engine.backward(loss)
        engine.step()

    sec = timed_steps(dev, steps, warmup, one_step)
    peak = peak_memory(dev)
    # fp32 in DeepSpeed's config = PyTorch's defaults underneath (cuDNN TF32): compare with "default"
    precision = "default" if cfg.deepspeed.precision == "fp32" else cfg.deepspeed.precision
    return {"path": "deepspeed_engine", "stage": stage, "precision": precision, "channels_last": True,
            "zero_stage": cfg.deepspeed.zero_stage, "batch": batch, "step_seconds": sec,
            "samples_per_sec": batch / sec, "memory": {"peak_bytes": peak}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=float, default=230, help="seconds; later configurations are skipped")
    ap.add_argument("--matmul-n", type=int, default=8192)
    a = ap.parse_args(argv)

    t0 = time.time()
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from sdn_dist.config import load_config
    cfg = load_config(a.preset, overrides=["teacher.weights=random", "autocast=off", "use_gpu=" + str(dev.type == "cuda").lower()])
    batch = cfg.data.batch_size
    res: dict = {
        "command": "bash benchmarks/gpu.sh", "preset": a.preset, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
                     "python": platform.python_version()},
        "model": {"image_size": cfg.model.image_size, "width": cfg.model.width, "text_dim": cfg.text.dim,
                  "batch": batch},
        "matmul_flops_per_sec": {}, "flops_per_step": {}, "results": [], "skipped": [], "errors": [],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["elapsed_seconds"] = time.time() - t0
        out.write_text(json.dumps(res, indent=1) + "\n")

    def over_budget(what: str) -> bool:
        if time.time() - t0 > a.budget:
            res["skipped"].append(what)
            return True
        return False

    reps = 10 if dev.type == "cuda" else 2
    for p in ("fp32", "tf32", "bf16"):
        res["matmul_flops_per_sec"][p] = matmul_peak(dev, p, a.matmul_n, reps)
    for stage in (1, 2):
        res["flops_per_step"][f"stage{stage}"] = step_flops(cfg, dev, stage, batch)
    save()
    print(f"matmul TFLOP/s: { {k: round(v / 1e12, 1) for k, v in res['matmul_flops_per_sec'].items()} }", flush=True)

    def add(r: dict) -> None:
        f = res["flops_per_step"][f"stage{r['stage']}"] * r["batch"] / batch
        achieved = f / r["step_seconds"]
        prec = PEAK_OF.get(r["precision"], "tf32")
        r["achieved_flops_per_sec"] = achieved
        r["mfu"] = achieved / res["matmul_flops_per_sec"][prec]
        r["mfu_nominal"] = achieved / NOMINAL_H100_SXM[prec] if "H100" in res["device_name"] else None
        res["results"].append(r)
        save()
        print(f"stage {r['stage']} {r['path']:16s} {r['precision']:7s} cl={int(r.get('channels_last', True))} "
              f"batch {r['batch']:3d}: {r['samples_per_sec']:8.1f} samples/s  {r['step_seconds'] * 1e3:7.1f} ms  "
              f"MFU {r['mfu']:.3f}  peak mem {(r['memory']['peak_bytes'] or 0) / 2**30:.2f} GiB", flush=True)

    for stage in (1, 2):
        for precision in ("default", "fp32", "bf16"):
            for cl in (False, True):
                name = f"plain stage{stage} {precision} channels_last={cl}"
                if over_budget(name):
                    continue
                try:
                    add(run_plain(cfg, dev, stage, precision, cl, batch, a.steps, a.warmup))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: record and go on
                    res["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    save()

    try:
        __import__("deepspeed")
        have_ds = True
    except Exception as e:  # noqa: BLE001
        have_ds = False
        res["skipped"].append(f"deepspeed engine: not importable ({type(e).__name__})")
    for stage in (1, 2) if have_ds else ():
        name = f"deepspeed engine stage{stage}"
        if over_budget(name):
            continue
        try:
            add(run_engine(cfg, dev, stage, batch, a.steps, a.warmup))
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"{name}: {type(e).__name__}: {e}")
            save()

    plain = [r for r in res["results"] if r["path"] == "plain"]
    best = {}
    for stage in (1, 2):
        mine = [r for r in plain if r["stage"] == stage]
        if mine:
            best[f"stage{stage}"] = max(mine, key=lambda r: r["samples_per_sec"])
    res["best"] = {k: {x: v[x] for x in ("precision", "channels_last", "samples_per_sec", "mfu", "mfu_nominal")}
                   for k, v in best.items()}
    # Throughput headroom: the fastest setting at larger micro-batches (stage 2 is the slower).
    if "stage2" in best:
        b2 = best["stage2"]
        for mult in (2, 4):
            name = f"batch sweep stage2 x{mult}"
            if over_budget(name):
                continue
            try:
                add(run_plain(cfg, dev, 2, b2["precision"], b2["channels_last"], batch * mult, a.steps, a.warmup))
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{name}: {type(e).__name__}: {e}")
                break
    save()
    print(f"wrote {out} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
