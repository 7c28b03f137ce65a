"""The per-worker training loop: frozen teacher beside a DeepSpeed-wrapped student, two stages.

Runs inside a Ray Train worker (``driver.py`` starts ``workers`` of them); ``train_worker`` reads
top to bottom: build -> resume -> for each step: batch + step, maybe log (and let the stage schedule
see the loss), maybe sample, maybe checkpoint, maybe switch -> export. Each "maybe" is one ``due``.
The teacher is built here, outside the engine and every optimizer, and never saved as trainable state.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import deepspeed
import ray
import ray.train

from sdn_dist import fsio
from sdn_dist.config import Config, StageConfig, deep_merge
from sdn_dist.data.pipeline import as_float_images
from sdn_dist.data.readers import DataFeed, DataSpec, peak_rss_bytes, run_at_raylet_priority
from sdn_dist.model.losses import Stage
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import build_teacher
from sdn_dist.training.checkpoint import Checkpointer
from sdn_dist.training.collector import StepRecord, event, message
from sdn_dist.training.export import export_student, param_digest
from sdn_dist.training.grids import SampleGrid
from sdn_dist.training.preemption import WorkerPreemption
from sdn_dist.training.precision import resolve_autocast
from sdn_dist.training.state import RNG, TrainState, capture_rng, restore_rng


def deepspeed_config(cfg: Config, stage: StageConfig) -> dict:
    """The DeepSpeed JSON for one stage (a user JSON in deepspeed.config overrides keys)."""
    ds = cfg.deepspeed
    conf = {
        "train_batch_size": cfg.data.batch_size,
        # The global batch stays data.batch_size at whatever world size this attempt has (elastic).
        "train_micro_batch_size_per_gpu": cfg.micro_batch_at(_world_size(cfg)),
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
    if stage.lr_schedule == "warmup_cosine":
        # DeepSpeed's own scheduler: the engine steps it per optimizer step and saves/loads its
        # position with the checkpoint, so a resumed stage continues the same curve.
        conf["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": stage.steps, "warmup_num_steps": max(1, stage.warmup_steps),
            "warmup_min_ratio": 0.0, "warmup_type": "linear", "cos_min_ratio": stage.min_lr_ratio}}
    if ds.comm_dtype != "fp32":
        conf["communication_data_type"] = ds.comm_dtype
    if ds.config:
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


def with_resolved_autocast(cfg: Config, device: torch.device):
    """(cfg with ``autocast`` resolved on ``device``, {"asked", "used", "why"}): precision.resolve_autocast."""
    used, why = resolve_autocast(cfg.autocast, device)
    return cfg.model_copy(update={"autocast": used}), {"asked": cfg.autocast, "used": used, "why": why}


def _world_size(cfg: Config) -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else cfg.max_workers


def _this_environments_tools_first() -> None:
    """torch JIT-builds DeepSpeed's ops (its shared-memory collective, at the first engine of a
    process) with whichever ``ninja`` is first on PATH. A run's processes do not all share a PATH
    (the driver's shell, `ray start` nodes, `ray job submit`), and ninja >= 1.12 (this
    environment's) and older system ninjas hash their build log differently: alternating, each
    rebuilt the op (~30 s) in the build directory they share. Put this interpreter's bin first."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def build_engine(cfg: Config, stage_cfg: StageConfig, text_dim: int, device, text_stats: dict | None = None,
                 weights: dict | None = None):
    """A fresh student + fresh optimizer inside a DeepSpeed engine (one per stage, as the method
    says). ``text_stats``: the driver's DataSpec.text_stats (model.text_norm = standardize).
    ``weights``: a full student state dict to start from (the stage switch hands the stage-1
    weights over in memory); loaded before DeepSpeed sees the module, so every ZeRO stage's
    optimizer (and ZeRO-3's partitioning) starts from them."""
    _this_environments_tools_first()
    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    student = Student(cfg.model, text_dim)
    if cfg.model.text_norm == "standardize":
        if text_stats is None:
            raise ValueError("model.text_norm=standardize needs the training captions' statistics (DataSpec.text_stats)")
        student.set_text_statistics(text_stats)
    if weights is not None:
        student.load_state_dict(weights)
    student = prepare_student(student.to(device))
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
    """A micro-batch (numpy or tensors) -> (real images, text embeddings) on ``device``. ``image``:
    float [b,3,S,S] in [0,1], or a reader's uint8 [b,S,S,3], converted on ``device`` (the same
    values: pipeline.as_float_images)."""
    real = torch.as_tensor(image).to(device)
    if real.dtype == torch.uint8:
        real = as_float_images(real)
    return real.contiguous(memory_format=MEMORY_FORMAT), torch.as_tensor(text).to(device, dtype)


def distill_step(teacher, student, real: torch.Tensor, text: torch.Tensor, stage: Stage,
                 autocast: str = "off") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch forward -> (loss, {point: detached loss}); the caller does backward/step.

    The teacher's pass over the real image is a constant target (no graph); in a stage that goes
    through the teacher (stage 2) the generated image goes through the frozen teacher and the
    gradient flows through it to the student. Shared with the benchmark's plain PyTorch loop
    (``sdn_dist.apps.bench.bench``): same work. ``autocast`` (resolved: "bf16" or "off"): "bf16"
    runs the forward passes in bf16, the losses (and all weights) stay fp32.
    """
    if autocast == "auto":   # would silently run fp32: resolve it once, up front
        raise ValueError("autocast=auto reached the training step unresolved: "
                         "use loop.with_resolved_autocast(cfg, device) first")
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        with torch.no_grad():
            t_real = teacher(real)
        pred = student(text)
        if stage.through_teacher:
            pred = teacher(pred["image"].float())  # gradients flow through the frozen teacher
    return stage({k: v.float() for k, v in t_real.items()}, {k: v.float() for k, v in pred.items()})


def student_state_dict(engine) -> dict:
    """Full-precision student weights on every rank. ZeRO-3 (the engine partitions its weights)
    gathers its partitions on every rank (collective): its consolidated state dict would exist on
    rank 0 only, leaving the other ranks' final digest that of nothing."""
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def train_step(engine, teacher, feed: DataFeed, state: TrainState, text_dim: int, grad_accum: int,
               autocast: str):
    """One optimizer step over ``grad_accum`` micro-batches in ``state.stage`` -> (loss,
    {point: loss}, good samples); advances ``state.step`` by one and ``state.data_position`` by the
    global stream slots the ranks drew (good or bad: ``feed.slots`` per micro-batch, all ranks').

    Loss and per-point losses are the mean over the micro-batches, left on the device (read back
    only at log steps: a float() per step would be 23 host syncs per step on a GPU); ``None`` when
    every sample of the step was skipped as bad.
    """
    accum = grad_accum
    loss_sum, parts_sum, n = None, {}, 0
    for _ in range(accum):
        b = feed.next()
        state.data_position += feed.slots
        if not len(b):
            # Every sample of this micro-batch was bad: still take part in the gradient
            # all-reduce (with zero gradients) so that the ranks stay in step.
            dtype = next(engine.module.parameters()).dtype
            out = engine(torch.zeros(1, text_dim, device=engine.device, dtype=dtype))
            engine.backward(sum(v.float().sum() for v in out.values()) * 0.0)
            engine.step()
            continue
        real, text = prepare_batch(b.image, b.text, engine.device, next(engine.module.parameters()).dtype)
        loss, parts = distill_step(teacher, engine, real, text, state.schedule.stage(state.stage), autocast)
        engine.backward(loss)
        engine.step()
        loss_sum = loss.detach() / accum + (0.0 if loss_sum is None else loss_sum)
        parts_sum = {k: v / accum + parts_sum.get(k, 0.0) for k, v in parts.items()}
        n += len(b)
    state.step += 1
    return loss_sum, parts_sum, n


class StepLog:
    """The logging window of one rank: accumulates steps, then emits a ``StepRecord``."""

    def __init__(self, collector, rank: int, world: int, attempt: str, feed: DataFeed, start_step: int):
        self.collector, self.rank, self.world, self.attempt, self.feed = collector, rank, world, attempt, feed
        self.node_id = ray.get_runtime_context().get_node_id()
        self.first = True
        self._open(start_step)

    def _open(self, step: int) -> None:
        self.t0, self.n, self.wait0, self.step0 = time.time(), 0, self.feed.wait_seconds, step
        self.loss, self.parts = None, {}

    def add(self, loss, parts: dict, n: int) -> None:
        # keeps the last step's values (on the device); counts the window's samples
        if loss is not None:
            self.loss, self.parts = loss, parts
        self.n += n
        if self.first:
            self.first = False
            if self.rank == 0:   # the end of this group's first step: training/recovery.py dates recoveries by it
                self.collector.report.remote([event("first_step", rank=0, step=self.step0 + 1, pid=os.getpid())])

    def write(self, state: TrainState, engine, per_step: int) -> float:
        """Send this rank's record; returns the loss averaged over the ranks (the same on every rank)."""
        values = [0.0] if self.loss is None else torch.stack(
            [self.loss.float(), *(v.float() for v in self.parts.values())]).tolist()
        points = dict(zip(self.parts, values[1:]))
        mean = torch.tensor([values[0], float(self.loss is not None)], dtype=torch.float64)
        dist.all_reduce(mean)
        dt = time.time() - self.t0
        rec = StepRecord(
            step=state.step, stage=state.stage, rank=self.rank, world_size=self.world, node_id=self.node_id,
            attempt=self.attempt, pid=os.getpid(), loss=values[0], points=points, lr=float(engine.get_lr()[0]),
            samples_per_sec=self.n * self.world / max(dt, 1e-9),
            data_wait_seconds=self.feed.wait_seconds - self.wait0,
            step_seconds=dt / max(1, state.step - self.step0), window_steps=state.step - self.step0,
            samples=state.step * per_step * self.world, skipped=self.feed.skipped,
            rss_peak_bytes=peak_rss_bytes(), reader_rss_peak_bytes=self.feed.rss_peak_bytes,
            reader_node_ids=list(self.feed.node_ids))
        self.collector.report.remote([rec.to_json()])
        self._open(state.step)
        return float(mean[0] / max(float(mean[1]), 1.0))


def due(step: int, every: int, schedule) -> bool:
    """Every ``every`` steps (0 = never), and always at the end of each stage."""
    return bool(every and step % every == 0) or step in (schedule.switch_step, schedule.end)


def train_worker(config: dict) -> None:
    """Ray Train's entry point on every rank. config: {"cfg": Config, "data": DataSpec,
    "collector": RecordCollector handle, "attempt": str}."""
    cfg, spec, collector, attempt = config["cfg"], config["data"], config["collector"], config["attempt"]
    run_at_raylet_priority()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    cfg, autocast = with_resolved_autocast(cfg, device)     # autocast=auto -> bf16 or off, on this device
    if rank == 0:
        collector.report.remote([message(f"autocast: {autocast['asked']} -> {autocast['used']} ({autocast['why']})",
                                         autocast=autocast)])
    torch.manual_seed(cfg.seed)  # a random-init teacher (the ablation) must be the same on every rank
    teacher = prepare_teacher(build_teacher(cfg.model, cfg.teacher).to(device))
    ckpt = Checkpointer(cfg.out, cfg.checkpoint.keep, rank, world, cfg.checkpoint,   # it reports its own saves and uploads
                        report=collector.report.remote, say=lambda text: collector.report.remote([message(text)]))
    state, engine, averaged = resume(cfg, ckpt, rank, world, spec, device)   # averaged: the EMA student or None
    if rank == 0:   # one start event per worker-group start: sdn_train_restarts_total, sdn_train_world_size
        collector.report.remote([event("start", step=state.step, stage=state.stage, rank=0, world_size=world, pid=os.getpid())])
    if rank == 0 and state.step:
        collector.report.remote([message(f"resumed from step-{state.step:08d} in stage {state.stage} "
                                         f"on {world} worker(s) (attempt {attempt})")])
    micro = cfg.micro_batch_at(world)                         # the global batch split over this world
    per_step = micro * cfg.deepspeed.grad_accum               # samples this rank draws per step
    feed = DataFeed(spec, rank, world, micro, state.data_position)
    preempt = WorkerPreemption(collector, cfg.checkpoint.preempt_grace_seconds, rank)
    # ZeRO-3: every rank takes part in the grid's forward (see SampleGrid).
    grid = (SampleGrid(cfg.out, cfg.data, cfg.samples, cfg.model.image_size, cfg.seed, spec.text, device,
                       collector.report.remote, rank)
            if rank == 0 or cfg.deepspeed.zero_stage == 3 else None)
    log = StepLog(collector, rank, world, attempt, feed, state.step)
    schedule = state.schedule

    while state.step < schedule.end:
        before = boundary(state, engine)
        try:
            engine.train()
            log.add(*train_step(engine, teacher, feed, state, spec.text_dim, cfg.deepspeed.grad_accum, cfg.autocast))
            if averaged is not None:
                averaged.update_parameters(engine.module)
            if due(state.step, cfg.metrics.log_every, schedule):
                mean_loss = log.write(state, engine, per_step)
                if schedule.observe(state.step, mean_loss) and rank == 0:
                    collector.report.remote([message(f"stage 1 plateaued: switching to stage 2 at step {state.step}",
                                                     switch_step=state.step)])
            if grid is not None and due(state.step, cfg.samples.every, schedule):
                grid.write(engine.module if averaged is None else averaged.module, state.step, state.stage)
            saved = due(state.step, cfg.checkpoint.every, schedule)
            if saved:
                save(ckpt, engine, averaged, state)
            # A worker announced its SIGTERM: its node may be SIGKILLed before the next agreement step.
            # At ZeRO 0 the lowest rank left checkpoints this step by itself (preemption.py); not collective.
            if not engine.zero_optimization() and preempt.writes_alone(world):
                stop_alone(ckpt, engine, averaged, state, collector, rank, preempt, feed)
                return
            # Collective (every rank stops at the same step), so not every step: see preempt_check_every.
            if due(state.step, cfg.checkpoint.preempt_check_every, schedule) and preempt.requested():
                stop_preempted(ckpt, engine, averaged, state, collector, rank, saved, preempt, feed)
                return
        except RuntimeError:   # a collective failed (gloo: a peer's connection closed)
            if not after_peer_loss(ckpt, engine, averaged, state, before, collector, rank, world, preempt, feed):
                raise
            return
        if schedule.switches_after(state.step, state.stage):
            weights = student_state_dict(engine)     # full fp32 on every rank (ZeRO-3 gathers)
            del engine, averaged                           # the old optimizer's memory, before the new one's
            engine, averaged = next_stage(cfg, state, spec, device, weights)
            del weights                                    # the engine holds them now (the paper model: 575 MB)
            if rank == 0:
                collector.report.remote([message(f"switched to stage {state.stage} at step {state.step}")])

    preempt.close()
    finish(cfg, engine, averaged, state, spec, collector, rank, feed)
    ckpt.finish()   # the last checkpoint's upload is done, or the run fails here


def next_stage(cfg: Config, state: TrainState, spec: DataSpec, device, weights: dict):
    """The stage switch: ``state`` moves to the stage its schedule says comes next, and the same
    weights (handed over in memory) go into a fresh engine with that stage's optimizer -> (engine,
    a fresh EMA or None: each stage averages its own weights)."""
    state.stage = state.schedule.stage_at(state.step)
    engine = build_engine(cfg, state.schedule.stage(state.stage).config, spec.text_dim, device, spec.text_stats,
                          weights=weights)
    return engine, average(engine.module, cfg.ema.decay)


def save(ckpt: Checkpointer, engine, averaged, state: TrainState) -> None:
    """Collective: every rank saves its part of every stateful thing of the run (the engine's
    student, optimizer and lr scheduler; the train state, the RNGs, the EMA when ``ema.decay`` is
    on); the Checkpointer reports the checkpoint once it is complete (with a remote ``out``, after
    its background upload)."""
    ckpt.save(engine, state.step, _states(state, averaged))


def _states(state: TrainState, averaged) -> dict:
    """Every stateful thing of the run besides the engine, by the name a checkpoint keeps it under."""
    return {"train": state, "rng": RNG, "ema": averaged}


def stop_alone(ckpt: Checkpointer, engine, averaged, state: TrainState, collector, rank: int,
               preempt: WorkerPreemption, feed: DataFeed) -> None:
    """A training worker announced its SIGTERM and this rank is the lowest one left (ZeRO 0):
    checkpoint this step by itself (``Checkpointer.save_alone``: no collective, the preempted rank
    may be gone), tell the driver, return. The driver then exits 75, which ends the other ranks."""
    ckpt.save_alone(engine, state.step, _states(state, averaged))
    _report_preempted(collector, state, rank)
    feed.close()
    preempt.close()


def boundary(state: TrainState, engine) -> tuple:
    """What the coming step changes before its optimizer update, as it is before it: the step, the
    data position, the RNGs and DeepSpeed's optimizer-step count (``after_peer_loss``)."""
    return state.step, state.data_position, capture_rng(), engine.global_steps


def after_peer_loss(ckpt: Checkpointer, engine, averaged, state: TrainState, before: tuple, collector,
                    rank: int, world: int, preempt: WorkerPreemption, feed: DataFeed) -> bool:
    """A collective raised: a peer is gone. If it had announced its preemption (SIGKILLed before
    this rank reached a step boundary after the announcement: a long step) and this rank is the
    one to write alone (ZeRO 0), checkpoint the last step that completed: the current one if the
    loop got past ``train_step``, else the one before it, as long as this step's optimizer update
    had not run (DeepSpeed all-reduces the gradients before it): its data position and RNGs from
    ``before``. Races Ray Train, which kills the survivors about 2 s after a peer's death
    (docs/reliability.md). False: the caller re-raises (Ray Train restarts from the last checkpoint)."""
    if engine.zero_optimization() or not preempt.writes_alone(world, wait_seconds=1.0):
        return False
    step, position, rng, global_steps = before
    if state.step == step:                     # the step did not finish
        if engine.global_steps != global_steps:
            return False                       # its optimizer update ran: no step's state
        state.data_position = position
        restore_rng(rng)
    stop_alone(ckpt, engine, averaged, state, collector, rank, preempt, feed)
    return True


def _report_preempted(collector, state: TrainState, rank: int) -> None:
    collector.report.remote([event("preempted", step=state.step, stage=state.stage, rank=rank,
                                   tag=f"step-{state.step:08d}"),
                             message(f"preempted: checkpoint step-{state.step:08d} saved; "
                                     "rerun the same command to resume")])


def stop_preempted(ckpt, engine, averaged, state: TrainState, collector, rank: int, saved: bool,
                   preempt: WorkerPreemption, feed: DataFeed) -> None:
    """SIGTERM somewhere: checkpoint this step (unless just done), wait for its upload, tell the
    driver, return normally (an exception would make Ray Train retry the group)."""
    if not saved:
        save(ckpt, engine, averaged, state)
    ckpt.finish()
    if rank == 0:
        _report_preempted(collector, state, rank)
    feed.close()
    dist.barrier()
    preempt.close()


def resume(cfg: Config, ckpt: Checkpointer, rank: int, world: int, spec: DataSpec, device):
    """Collective -> (state, engine, EMA or None): the last complete checkpoint's, or a fresh start;
    rank 0 first removes checkpoints interrupted mid-write. The train state comes from the
    checkpoint's COMPLETE marker (it says which stage's engine to build); one load then restores
    the engine, the RNGs and the EMA. A checkpoint saved at the switch holds stage-1 optimizer
    state and EMA: only its weights go into the fresh stage-2 engine."""
    if rank == 0:
        ckpt.clean_incomplete()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    state = TrainState.start(cfg.stage1, cfg.stage2, world)
    latest = ckpt.latest()       # its COMPLETE marker is the train state's state_dict
    if latest is not None:
        state.load_state_dict(latest)
    saved_stage, state.stage = state.stage, state.schedule.stage_at(state.step)
    engine = build_engine(cfg, state.schedule.stage(state.stage).config, spec.text_dim, device, spec.text_stats)
    averaged = average(engine.module, cfg.ema.decay)
    if latest is not None:
        switch = saved_stage != state.stage
        ckpt.load(engine, latest["tag"], {"rng": RNG, "ema": None if switch else averaged}, module_only=switch)
    return state, engine, averaged


def average(student: torch.nn.Module, decay: float):
    """A fresh exponential moving average of ``student`` (torch's AveragedModel; the Checkpointer
    saves and restores it), or None when ``decay`` (``ema.decay``) is 0."""
    if not decay:
        return None
    return AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def finish(cfg: Config, engine, averaged, state: TrainState, spec: DataSpec, collector, rank: int,
           feed: DataFeed) -> None:
    """Every rank reports a digest of its final weights (data parallelism made visible); rank 0
    exports the student (the averaged one when ``ema.decay`` is on) for `generate` and `eval`."""
    sd = student_state_dict(engine) if averaged is None else {
        k: v.detach().float().cpu().clone() for k, v in averaged.module.state_dict().items()}
    collector.report.remote([event("final", rank=rank, step=state.step, stage=state.stage, pid=os.getpid(),
                                   world_size=state.world_size, param_sha256=param_digest(sd), skipped=feed.skipped)])
    if rank == 0:
        export_student(cfg, sd, spec.text, state.step)
    feed.close()
    dist.barrier()
