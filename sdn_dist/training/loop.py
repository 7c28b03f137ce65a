"""The per-worker training loop: frozen teacher beside a DeepSpeed-wrapped student, two stages.

Runs inside a Ray Train worker (``launch.py`` starts ``workers`` of them); reads top to bottom:
build -> resume -> loop(step, log, checkpoint, sample, switch stage) -> export.
The teacher is built here, outside the engine and every optimizer, and never saved as trainable state.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from sdn_dist import fsio
from sdn_dist.training.checkpoint import Checkpointer, rng_state, set_rng_state
from sdn_dist.config import Config, StageConfig
from sdn_dist.model.losses import stage1_loss, stage2_loss
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import build_teacher


def deepspeed_config(cfg: Config, stage: StageConfig) -> dict:
    """The DeepSpeed JSON for one stage (a user JSON in deepspeed.config overrides keys)."""
    ds = cfg.deepspeed
    conf = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        # torch_adam: torch's own Adam, no 2-minute JIT build of DeepSpeed's fused Adam on CPU.
        "optimizer": {"type": "Adam", "params": {
            "lr": stage.lr, "betas": list(stage.betas), "weight_decay": stage.weight_decay,
            "torch_adam": True, "adam_w_mode": stage.weight_decay > 0}},
        "zero_optimization": zero_optimization(ds),
        "gradient_clipping": ds.grad_clip,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.comm_dtype != "fp32":
        conf["communication_data_type"] = ds.comm_dtype
    if ds.config:
        from sdn_dist.config import deep_merge
        conf = deep_merge(conf, json.loads(fsio.read_text(ds.config)))
    return conf


def zero_optimization(ds) -> dict:
    """DeepSpeed's zero_optimization section from the deepspeed.* keys (config.py documents each).
    The bucket and overlap keys only act in ZeRO 1/2; ZeRO 0 reduces in one flat all-reduce."""
    conf = {"stage": ds.zero_stage}
    if ds.zero_stage in (1, 2):
        conf.update(overlap_comm=ds.overlap_comm, reduce_bucket_size=ds.reduce_bucket_size,
                    allgather_bucket_size=ds.allgather_bucket_size, contiguous_gradients=ds.contiguous_gradients)
    return conf


def build_engine(cfg: Config, stage_cfg: StageConfig, text_dim: int, device):
    """A fresh student + fresh optimizer inside a DeepSpeed engine (one per stage, as the method says)."""
    import deepspeed
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    student = prepare_student(Student(cfg.model, text_dim).to(device))
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                           config=deepspeed_config(cfg, stage_cfg))
    return engine


# channels_last (NHWC): oneDNN on CPUs and cuDNN on GPUs run their convolutions in it without
# reordering every activation; 1.2-1.3x per step at the demo size on 2 CPU cores
# (docs/performance.md). Only the memory layout changes: values, keys and shapes stay the same.
MEMORY_FORMAT = torch.channels_last


def prepare_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher as the step runs it: 4-D weights in MEMORY_FORMAT."""
    return teacher.to(memory_format=MEMORY_FORMAT)


def _nhwc_input(module, args):
    return (args[0].contiguous(memory_format=MEMORY_FORMAT), *args[1:])


def prepare_student(student: torch.nn.Module) -> torch.nn.Module:
    """The student as the step runs it: every convolution takes its input in MEMORY_FORMAT (its
    outputs follow). Its weights stay NCHW: DeepSpeed's initial broadcast views each parameter as
    bytes (needs a stride-1 last dimension) and ZeRO re-seats parameters in flat buffers."""
    for m in student.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(_nhwc_input)
    return student


def prepare_batch(image, text, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A reader's micro-batch (numpy or tensors) -> (real images, text embeddings) on ``device``."""
    real = torch.as_tensor(image).to(device).contiguous(memory_format=MEMORY_FORMAT)
    return real, torch.as_tensor(text).to(device, dtype)


def distill_step(teacher, student, real: torch.Tensor, text: torch.Tensor, stage: int,
                 cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch forward -> (loss, {point: detached loss}); the caller does backward/step.

    The teacher's pass over the real image is a constant target (no graph); in stage 2 the
    generated image goes through the frozen teacher and the gradient flows through it to the
    student. Shared with the benchmark's plain PyTorch loop (``sdn_dist.commands.bench``): same work.
    """
    # cfg.autocast: the forward passes in bf16, the losses (and all weights) in fp32.
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
        with torch.no_grad():
            t_real = teacher(real)
        out = student(text)
        if stage == 2:
            t_gen = teacher(out["image"].float())  # gradients flow through the frozen teacher
    t_real = {k: v.float() for k, v in t_real.items()}
    if stage == 1:
        return stage1_loss(t_real, {k: v.float() for k, v in out.items()}, cfg.stage1)
    return stage2_loss(t_real, {k: v.float() for k, v in t_gen.items()}, cfg.stage2)


def student_state_dict(engine, cfg: Config) -> dict:
    """Full-precision student weights on every rank (ZeRO-3 gathers its partitions)."""
    if cfg.deepspeed.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in (sd or {}).items()}


def _digest(state_dict: dict) -> str:
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].numpy().tobytes())
    return h.hexdigest()


def _host_values(loss_sum: torch.Tensor | None, parts_sum: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The step's loss and per-point losses as Python floats, in one device-to-host copy."""
    if loss_sum is None:   # every micro-batch of the step was empty (all samples skipped)
        return 0.0, {}
    values = torch.stack([loss_sum.float(), *(v.float() for v in parts_sum.values())]).tolist()
    return values[0], dict(zip(parts_sum, values[1:]))


def train_worker(config: dict) -> None:
    import ray.train

    from sdn_dist.data.readers import DataFeed, peak_rss_bytes, run_at_raylet_priority
    from sdn_dist.training.grids import SampleGrid

    run_at_raylet_priority()
    cfg = Config.model_validate(config["cfg"])
    coord = config["coordinator"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    attempt = config["attempt"]

    torch.manual_seed(cfg.seed)  # a random-init teacher (the ablation) must be the same on every rank
    teacher = prepare_teacher(build_teacher(cfg.model, cfg.teacher).to(device))
    ckpt = Checkpointer(cfg.out, cfg.checkpoint.keep, rank)
    if rank == 0:
        ckpt.clean_incomplete()
    dist.barrier()
    resume = ckpt.latest()

    step = resume["step"] if resume else 0
    switch_step = resume.get("switch_step", cfg.stage1.steps) if resume else cfg.stage1.steps
    stage = 1 if step < switch_step else 2
    end = switch_step + cfg.stage2.steps
    stage_cfg = cfg.stage1 if stage == 1 else cfg.stage2
    engine = build_engine(cfg, stage_cfg, config["text_dim"], device)
    if resume:
        # A checkpoint taken in stage 1 but loaded for stage 2 (the switch) brings weights only.
        state = ckpt.load(engine, resume["tag"], module_only=resume["stage"] != stage)
        set_rng_state(state.get("tensors", {}).get("rng"))
        if rank == 0:
            coord.event.remote(f"resumed from {resume['tag']} in stage {stage} (attempt {attempt})")

    spec = dict(config["data_spec"], rank=rank, world_size=world, micro_batch=cfg.micro_batch)
    per_step = cfg.micro_batch * cfg.deepspeed.grad_accum   # samples this rank consumes per step
    feed = DataFeed(spec, start_sample=step * per_step, readers=cfg.data.readers, prefetch=cfg.data.prefetch)
    grid = SampleGrid(cfg, config["text_spec"], device) if rank == 0 else None
    dtype = next(engine.module.parameters()).dtype

    last_saved = resume["step"] if resume else -1

    def save(tag_step: int) -> None:
        nonlocal last_saved
        if tag_step == last_saved:
            return
        last_saved = tag_step
        ckpt.save(engine, tag_step, {"stage": stage, "switch_step": switch_step, "data_samples": tag_step * per_step,
                                     "attempt": attempt, "world_size": world},
                  {"rng": rng_state()})
        if rank == 0:
            coord.event.remote(f"checkpoint step {tag_step} saved in {ckpt.last_save_seconds:.2f}s")
            coord.report.remote([{"event": "checkpoint", "step": tag_step, "stage": stage, "rank": 0,
                                  "checkpoint_seconds": ckpt.last_save_seconds, "time": time.time()}])

    window_t, window_n, wait0, window_s0 = time.time(), 0, feed.wait_seconds, step
    pending: list[dict] = []
    while step < end:
        if stage == 1 and step >= switch_step:
            # The switch: stage-1 checkpoint, then the same weights under a fresh optimizer.
            save(step)
            stage, stage_cfg = 2, cfg.stage2
            tag = ckpt.latest()["tag"]
            engine = build_engine(cfg, stage_cfg, config["text_dim"], device)
            ckpt.load(engine, tag, module_only=True)
            if rank == 0:
                coord.event.remote(f"switched to stage 2 at step {step}")

        engine.train()
        # Summed on the device and read back only at log steps: a float() per step would be a
        # host sync per step (23 of them: the loss and each point's) on a GPU.
        parts_sum: dict[str, torch.Tensor] = {}
        loss_sum: torch.Tensor | None = None
        for _ in range(cfg.deepspeed.grad_accum):
            b = feed.next()
            if not b["captions"]:
                # Every sample of this micro-batch was skipped as bad: still take part in the
                # gradient all-reduce (with zero gradients) so the ranks stay in step.
                out = engine(torch.zeros(1, config["text_dim"], device=device, dtype=dtype))
                engine.backward(sum(v.float().sum() for v in out.values()) * 0.0)
                engine.step()
                continue
            real, text = prepare_batch(b["image"], b["text"], device, dtype)
            loss, parts = distill_step(teacher, engine, real, text, stage, cfg)
            engine.backward(loss)
            engine.step()
            share = loss.detach() / cfg.deepspeed.grad_accum
            loss_sum = share if loss_sum is None else loss_sum + share
            for k, v in parts.items():
                parts_sum[k] = v / cfg.deepspeed.grad_accum + (parts_sum[k] if k in parts_sum else 0.0)
            window_n += len(b["captions"])
        step += 1

        if step % cfg.metrics.log_every == 0 or step == end or step == switch_step:
            loss_value, parts_value = _host_values(loss_sum, parts_sum)   # the window's device work done
            dt = time.time() - window_t
            rec = {"step": step, "stage": stage, "rank": rank, "attempt": attempt, "pid": os.getpid(), "loss": loss_value,
                   "samples_per_sec": window_n * world / max(dt, 1e-9),
                   "data_wait_seconds": feed.wait_seconds - wait0, "step_seconds": dt / max(1, step - window_s0), "window_steps": step - window_s0,
                   "samples": step * per_step * world, "skipped": feed.skipped, "time": time.time(),
                   "rss_peak_bytes": peak_rss_bytes(), "reader_rss_peak_bytes": feed.rss_peak_bytes,
                   **{f"loss/{k}": v for k, v in parts_value.items()}}
            pending.append(rec)
            ref = coord.report.remote(pending)
            new_switch = ray.get(ref) if rank == 0 and cfg.stage1.plateau.patience else None
            pending = []
            if cfg.stage1.plateau.patience and stage == 1:
                t = torch.tensor([new_switch if rank == 0 else 0], dtype=torch.long)
                dist.broadcast(t, src=0)   # all ranks switch at the same step
                if int(t) != switch_step:
                    switch_step = max(int(t), step)
                    end = switch_step + cfg.stage2.steps
            window_t, window_n, wait0, window_s0 = time.time(), 0, feed.wait_seconds, step

        if grid is not None and cfg.samples.every and step % cfg.samples.every == 0:
            grid.write(engine.module, step, stage)
        if step % cfg.checkpoint.every == 0 or step == end or (stage == 1 and step == switch_step):
            save(step)
        if stage == 1 and step == switch_step and grid is not None:
            grid.write(engine.module, step, stage)

    if grid is not None:
        grid.write(engine.module, step, stage)
    sd = student_state_dict(engine, cfg)
    # Data parallelism check made visible: every rank reports a digest of its final weights.
    coord.report.remote([{"event": "final", "rank": rank, "step": step, "stage": stage, "pid": os.getpid(),
                          "param_sha256": _digest(sd), "skipped": feed.skipped}])
    if rank == 0:
        from sdn_dist.training.export import export_student
        export_student(cfg, sd, config["text_spec"], step)
    feed.close()
    dist.barrier()
