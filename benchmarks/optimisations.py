#!/usr/bin/env python3
"""A/B of the training-step optimisations on the plain loop (demo preset, CPU).

    python benchmarks/optimisations.py [--threads 1] [--reps 7] [--steps 8] [--out ab.json]

Each variant is one training step (teacher on the real image, student, loss, backward, Adam) on
the same in-memory micro-batch; the variants run interleaved (baseline, A, B, ..., baseline, A,
B, ...) so that the load other jobs put on a shared machine hits them alike, and each is reported
as the median over repetitions of its step time / the baseline's step time in the same repetition.

    baseline        what trainer.py did before: NCHW, teacher(real) under no_grad, float() of the
                    loss and of the 22 per-point losses every step
    no_host_sync    baseline without the per-step float()s (the trainer now syncs at log steps)
    inference_mode  teacher(real) under torch.inference_mode instead of no_grad
    channels_last   teacher, student weights and input in channels_last (NHWC) memory format
    cl_input        teacher weights and input NHWC; the student's weights stay NCHW and its convs
                    get NHWC input (what the trainer does: DeepSpeed needs NCHW parameters)
    concat          stage 2: one teacher pass over cat([real, generated]) instead of two
    bf16            torch.autocast(bfloat16) around the forward
    cl_bf16         channels_last + bf16
    current         exactly what the trainer runs now (trainer.prepare_teacher / prepare_student /
                    prepare_batch / distill_step, no per-step sync)
    engine          current, with the student in the trainer's DeepSpeed engine (trainer.build_engine,
                    ZeRO-0, torch Adam; a one-process gloo group): DeepSpeed's own cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdn_dist.config import load_config  # noqa: E402
from sdn_dist.model.losses import stage1_loss, stage2_loss, stages  # noqa: E402
from sdn_dist.model.student import Student  # noqa: E402
from sdn_dist.model.teacher import build_teacher  # noqa: E402
from sdn_dist.training import loop as trainer  # noqa: E402


def variant(cfg, stage: int, name: str, real: torch.Tensor, text: torch.Tensor):
    """A closure running one optimizer step of ``name``."""
    torch.manual_seed(0)
    teacher = build_teacher(cfg.model, cfg.teacher)
    student = Student(cfg.model, text.shape[1])
    cl = name in ("channels_last", "cl_bf16")
    if cl:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
        real = real.contiguous(memory_format=torch.channels_last)
    if name == "cl_input":   # teacher in channels_last; the student's weights stay NCHW, its convs get NHWC input
        teacher = teacher.to(memory_format=torch.channels_last)
        real = real.contiguous(memory_format=torch.channels_last)
        for m in student.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(memory_format=torch.channels_last),))
    if name == "current":
        teacher, student = trainer.prepare_teacher(teacher), trainer.prepare_student(student)
    st = stages(cfg.stage1, cfg.stage2)[stage - 1].config
    if name == "engine":
        teacher = trainer.prepare_teacher(teacher)
        cfg_e = cfg.model_copy(update={"workers": 1})
        # model.text_norm: identity statistics, as the other variants' students have (speed only).
        engine = trainer.build_engine(cfg_e, st, text.shape[1], torch.device("cpu"),
                                      {"mean": [0.0] * text.shape[1], "std": 1.0})

        def engine_step():
            r, t = trainer.prepare_batch(real, text, torch.device("cpu"), torch.float32)
            loss, _ = trainer.distill_step(teacher, engine, r, t, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
            engine.backward(loss)
            engine.step()
        return engine_step
    opt = torch.optim.Adam(student.parameters(), lr=st.lr, betas=st.betas)
    bf16 = name in ("bf16", "cl_bf16")
    b = real.shape[0]

    def forward():
        if name == "current":
            r, t = trainer.prepare_batch(real, text, torch.device("cpu"), torch.float32)
            return trainer.distill_step(teacher, student, r, t, stages(cfg.stage1, cfg.stage2)[stage - 1], cfg.autocast)
        if name == "concat" and stage == 2:
            out = student(text)
            both = teacher(torch.cat([real, out["image"]]))       # [2B, ...]: real half first
            return stage2_loss({k: v[:b] for k, v in both.items()}, {k: v[b:] for k, v in both.items()}, st)
        ctx = torch.inference_mode if name == "inference_mode" else torch.no_grad
        with ctx():
            t_real = teacher(real)
        out = student(text)
        if stage == 1:
            return stage1_loss(t_real, {k: v.float() for k, v in out.items()}, st)
        return stage2_loss(t_real, teacher(out["image"].float()), st)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, parts = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if name not in ("no_host_sync", "current"):
            float(loss.detach())
            [float(v) for v in parts.values()]

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per repetition")
    ap.add_argument("--variants", default="baseline,no_host_sync,inference_mode,channels_last,cl_input,concat,bf16,cl_bf16,current,engine")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.preset, overrides=["teacher.weights=random", "autocast=off"])   # the fp32 step
    if "engine" in a.variants.split(","):
        import deepspeed
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", "29561")):
            os.environ.setdefault(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
    b, s = cfg.data.batch_size, cfg.model.image_size
    torch.manual_seed(1)
    real, text = torch.rand(b, 3, s, s), torch.randn(b, cfg.text.dim)
    names = a.variants.split(",")
    result = {"command": "python benchmarks/optimisations.py " + " ".join(argv or sys.argv[1:]),
              "preset": a.preset, "threads": a.threads, "batch": b, "torch": torch.__version__, "stages": {}}
    for stage in (1, 2):
        names_s = [n for n in names if not (n == "concat" and stage == 1)]
        steps = {n: variant(cfg, stage, n, real, text) for n in names_s}
        times = {n: [] for n in names_s}
        for n in names_s:   # warm-up (oneDNN primitive caches, allocator)
            for _ in range(2):
                steps[n]()
        for _ in range(a.reps):
            for n in names_s:
                t = time.perf_counter()
                for _ in range(a.steps):
                    steps[n]()
                times[n].append((time.perf_counter() - t) / a.steps)
        base = times["baseline"]
        rows = {}
        for n in names_s:
            speedup = statistics.median(bb / x for bb, x in zip(base, times[n]))
            rows[n] = {"ms_per_step": 1e3 * statistics.median(times[n]), "speedup_vs_baseline": speedup,
                       "ms_all": [round(1e3 * x, 1) for x in times[n]]}
            print(f"stage {stage} {n:15s} {rows[n]['ms_per_step']:7.1f} ms/step  x{speedup:.3f}", flush=True)
        result["stages"][f"stage{stage}"] = rows
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
