"""Fast tier: the method's core, each part against a direct computation (CPU, no Ray, no DeepSpeed).

    OMP_NUM_THREADS=1 python -m pytest tests/test_method.py -q

What a one-line bug in the method would change and nothing else in the fast tier would see: the
loss each stage computes (against the teacher, by hand), what a checkpoint carries (the EMA, the
stage schedule, the data position with gradient accumulation, the lr curve's position), which
point names preflight checks, and that an interrupted checkpoint is removed. Each test's docstring
names a product change it fails on.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdn_dist.config import load_config
from sdn_dist.model.losses import stages
from sdn_dist.model.plan import FC7, POINTS
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import build_teacher


def _cfg(*sets):
    return load_config("debug", overrides=list(sets))


def _models(cfg, seed=0):
    torch.manual_seed(seed)
    student = Student(cfg.model, cfg.text.dim)
    teacher = build_teacher(cfg.model, cfg.teacher)
    teacher.freeze()
    return student, teacher


def _inputs(cfg, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    return torch.rand(n, 3, s, s, generator=g), torch.randn(n, cfg.text.dim, generator=g)


def _by_hand(target: dict, pred: dict, weights: dict, loss: str) -> torch.Tensor:
    """sum over matched points of w * mean |a - b| (l2: mean (a - b)^2), written out."""
    total = 0.0
    for p in list(POINTS) + ([FC7] if FC7 in target and FC7 in pred else []):
        w = weights.get(p, 1.0)
        diff = pred[p].float() - target[p].float().detach()
        total = total + w * (diff.abs().mean() if loss == "l1" else diff.square().mean())
    return total


# The two stages get different distances and weights, so that one stage's settings used for the
# other show up in the value.
STAGE_SETS = ("stage1.loss=l1", "stage1.point_weights.image=3", "stage1.point_weights.conv3_1=0.5",
              "stage2.loss=l2", "stage2.point_weights.conv1_1=4", "stage2.point_weights.pool5=0")


@pytest.mark.parametrize("fc7", [False, True])
def test_stage2_loss_is_the_teacher_on_the_real_vs_the_teacher_on_the_generated_image(fc7):
    """Stage 2 (indirect distillation) = distance between the teacher's features of the real image
    and the teacher's features of the student's generated image, with stage 2's distance and
    weights; its gradient reaches the student through the frozen teacher.
    Fails on: distill_step computing stage 1's loss in stage 2 (the student's own tensors as
    prediction), the generated image detached before the teacher, stage 1's config used in stage 2,
    the real image's features used on both sides, the weights ignored."""
    from sdn_dist.training.loop import distill_step
    cfg = _cfg(*STAGE_SETS, f"model.distill_fc7={str(fc7).lower()}")
    student, teacher = _models(cfg)
    real, text = _inputs(cfg)
    loss, parts = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[1])
    generated = student(text)["image"]
    want = _by_hand(teacher(real), teacher(generated), cfg.stage2.point_weights, "l2")
    assert (FC7 in parts) == fc7 and "pool5" not in parts        # weight 0: not computed
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    # the gradient the student gets is that of the written-out loss
    got = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    ref = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    moved = 0
    for (name, _), a, b in zip(student.named_parameters(), got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8, msg=name)
            moved += int(a.abs().sum() > 0)
    assert moved > 0
    assert all(p.grad is None for p in teacher.parameters())    # the teacher stays frozen


def test_stage1_loss_is_the_teacher_on_the_real_image_vs_the_students_own_tensors():
    """Stage 1 (direct distillation) = distance between the teacher's features of the real image
    and the student's own intermediate tensors, with stage 1's distance and weights.
    Fails on: stage 1 computing stage 2's loss, stage 2's config used in stage 1, l1/l2 swapped,
    a point weight ignored, the fake image through the teacher as target."""
    from sdn_dist.training.loop import distill_step
    cfg = _cfg(*STAGE_SETS)
    student, teacher = _models(cfg)
    real, text = _inputs(cfg)
    loss, parts = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[0])
    out = student(text)
    want = _by_hand(teacher(real), out, cfg.stage1.point_weights, "l1")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert set(parts) == set(POINTS)
    # per-point values are the unweighted distances (logged by level)
    torch.testing.assert_close(parts["image"], (out["image"] - real).abs().mean().detach(), rtol=1e-5, atol=0)


def test_stage_losses_differ_on_the_same_inputs():
    """The two stages are different functions of the same batch (a stage-2 step that computes the
    stage-1 loss gives stage 1's number). Fails on: either stage's branch returning the other's."""
    from sdn_dist.training.loop import distill_step
    cfg = _cfg()
    student, teacher = _models(cfg)
    real, text = _inputs(cfg)
    l1, _ = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[0])
    l2, _ = distill_step(teacher, student, real, text, stages(cfg.stage1, cfg.stage2)[1])
    assert abs(l1.item() - l2.item()) > 1e-3 * max(l1.item(), l2.item())


# ------------------------------------------------------------------------------- checkpoint contents

class FakeEngine:
    """DeepSpeed's engine as the loop and the Checkpointer use it, on a plain torch Adam and
    DeepSpeed's own WarmupCosineLR (the scheduler ``loop.deepspeed_config`` names): the optimizer
    and the scheduler step once every ``grad_accum`` micro-steps, and ``save_checkpoint`` /
    ``load_checkpoint`` honour the same flags (the real engine is tested in the slow tier,
    tests/test_checkpoint.py)."""

    def __init__(self, cfg, stage_cfg, text_dim, device=None, text_stats=None, weights=None):
        from deepspeed.runtime.lr_schedules import WarmupCosineLR

        from sdn_dist.training.loop import deepspeed_config
        torch.manual_seed(cfg.seed)
        self.module = Student(cfg.model, text_dim)
        self.stage_cfg = stage_cfg
        if weights is not None:
            self.module.load_state_dict(weights)
        self.device = torch.device("cpu")
        conf = deepspeed_config(cfg, stage_cfg)
        p = conf["optimizer"]["params"]
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=p["lr"], betas=p["betas"])
        sched = conf.get("scheduler")
        self.lr_scheduler = WarmupCosineLR(self.optimizer, **sched["params"]) if sched else None
        self.accum, self.micro = conf["gradient_accumulation_steps"], 0
        self.global_steps = 0

    def __call__(self, text):
        return self.module(text)

    def train(self):
        self.module.train()

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.global_steps += 1
            self.optimizer.zero_grad()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    zero_stage = 0
    save_non_zero_checkpoint = True     # DeepSpeed's: this rank writes the model-states file (dp rank 0)

    def zero_optimization_partition_weights(self):
        return False

    def zero_optimization(self):
        return self.zero_stage > 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import os
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self._save_checkpoint(save_dir, tag, client_state)

    def _save_checkpoint(self, save_dir, tag, client_state):
        """DeepSpeed's: the model-states file, on the rank that writes it, no collective."""
        import os
        if self.save_non_zero_checkpoint:
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
                        **client_state}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, load_module_only, load_optimizer_states, load_lr_scheduler_states):
        import os
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        blob = torch.load(path, weights_only=True)
        self.module.load_state_dict(blob.pop("module"))
        opt, sched = blob.pop("optimizer"), blob.pop("lr_scheduler")
        if not load_module_only and load_optimizer_states:
            self.optimizer.load_state_dict(opt)
        if not load_module_only and load_lr_scheduler_states and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(sched)
        return path, blob


class FakeFeed:
    """A rank's stream: micro-batch i holds the ``micro_batch`` samples from slot ``start + i *
    micro_batch`` on (sample k: image and text drawn from seed k), the slots in ``bad`` skipped."""

    def __init__(self, cfg, micro_batch, start=0, bad=()):
        self.cfg, self.micro_batch, self.position, self.bad = cfg, micro_batch, start, set(bad)
        self.slots = micro_batch        # one rank: its micro-batch is all the global stream gives
        self.drawn: list[int] = []

    def next(self):
        s = self.cfg.model.image_size
        keep = [k for k in range(self.position, self.position + self.micro_batch) if k not in self.bad]
        self.drawn += keep
        self.position += self.micro_batch
        gens = [torch.Generator().manual_seed(k) for k in keep]
        image = torch.stack([torch.randint(0, 256, (s, s, 3), generator=g, dtype=torch.uint8) for g in gens]) if keep else torch.zeros(0, s, s, 3, dtype=torch.uint8)
        text = torch.stack([torch.randn(self.cfg.text.dim, generator=g) for g in gens]) if keep else torch.zeros(0, self.cfg.text.dim)
        return _Batch(image, text)

    def close(self):
        pass


class _Batch:
    def __init__(self, image, text):
        self.image, self.text = image, text

    def __len__(self):
        return len(self.image)


def _run_cfg(tmp_path, stage, *sets):
    """A run whose every step is in ``stage``: EMA on, 2 micro-batches per step, a warm-up +
    cosine lr curve in that stage."""
    other = 2 if stage == 1 else 1
    return _cfg("workers=1", "data.batch_size=4", "deepspeed.grad_accum=2", "ema.decay=0.5",
                f"stage{stage}.steps=5", f"stage{other}.steps=0", f"stage{stage}.lr=0.01",
                f"stage{stage}.lr_schedule=warmup_cosine", f"stage{stage}.warmup_steps=2",
                f"out={tmp_path / 'run'}", *sets)


def _fresh_run(cfg, stage_cfg):
    """Step 0 of a one-worker run in ``stage_cfg``: (train state, FakeEngine, EMA)."""
    from sdn_dist.training import loop
    from sdn_dist.training.state import TrainState
    state = TrainState.start(cfg.stage1, cfg.stage2, 1)
    engine = FakeEngine(cfg, stage_cfg, cfg.text.dim)
    return state, engine, loop.average(engine.module, cfg.ema.decay)


def _steps(k, engine, teacher, feed, state, averaged, cfg, lrs):
    from sdn_dist.training.loop import train_step
    for _ in range(k):
        train_step(engine, teacher, feed, state, cfg.text.dim, cfg.deepspeed.grad_accum, cfg.autocast)
        averaged.update_parameters(engine.module)
        lrs.append(engine.get_lr()[0])


@pytest.mark.parametrize("stage", [1, 2])
def test_a_resumed_stage_continues_exactly_where_it_stopped(tmp_path, monkeypatch, stage):
    """Save after 2 of 5 steps through the product's Checkpointer (a local directory), resume with
    ``loop.resume`` into a fresh engine, take the other 3: the learning rates, the weights, the
    EMA weights and the samples drawn equal an uninterrupted run's, bit for bit.
    Fails on: interrupted checkpoints never removed at the start, the EMA or the RNGs left out of
    ``loop.save``'s states or of ``loop.resume``'s load, a resume that restarts the lr curve (the
    scheduler's state not loaded), the optimizer state not loaded, the data position not saved or
    restored."""
    from sdn_dist.training import loop
    from sdn_dist.training.checkpoint import Checkpointer
    cfg = _run_cfg(tmp_path, stage)
    micro = cfg.micro_batch_at(1)
    _, teacher = _models(cfg)
    stage_cfg = stages(cfg.stage1, cfg.stage2)[stage - 1].config

    fresh = lambda: _fresh_run(cfg, stage_cfg)   # noqa: E731

    state, engine, averaged = fresh()
    assert state.stage == stage
    feed, want_lrs = FakeFeed(cfg, micro), []
    _steps(5, engine, teacher, feed, state, averaged, cfg, want_lrs)
    want = (engine.module.state_dict(), averaged.module.state_dict(), feed.drawn)

    state, engine, averaged = fresh()
    feed, lrs = FakeFeed(cfg, micro), []
    _steps(2, engine, teacher, feed, state, averaged, cfg, lrs)
    ck = Checkpointer(cfg.out, keep=2)
    torch.manual_seed(12345)            # the generator somewhere the resume's engine build does not re-seed it to
    loop.save(ck, engine, averaged, state)
    rng_after_save = torch.rand(8)      # what the generator gives next at the checkpoint
    drawn = feed.drawn
    del state, engine, averaged, feed

    interrupted = tmp_path / "run" / "checkpoints" / "step-00000004"   # a later save, killed mid-write
    interrupted.mkdir()
    (interrupted / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    monkeypatch.setattr(loop, "build_engine", FakeEngine)
    spec = type("Spec", (), {"text_dim": cfg.text.dim, "text_stats": None})()
    state, engine, averaged = loop.resume(cfg, Checkpointer(cfg.out, keep=2), 0, 1, spec, torch.device("cpu"))
    assert torch.equal(torch.rand(8), rng_after_save)     # the RNGs restored, not left where they were
    assert not interrupted.exists()
    assert (state.step, state.stage, state.data_position) == (2, stage, 2 * 2 * micro)
    feed = FakeFeed(cfg, micro, start=state.data_position)
    _steps(3, engine, teacher, feed, state, averaged, cfg, lrs)

    assert lrs == want_lrs and len(set(lrs)) == 4       # a curve (warm-up from 0, cosine back to 0)
    assert drawn + feed.drawn == want[2]
    for got, ref in ((engine.module.state_dict(), want[0]), (averaged.module.state_dict(), want[1])):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


class _Remote:
    def __init__(self, sent):
        self.remote = sent.append


def test_a_survivors_checkpoint_written_alone_resumes_exactly(tmp_path, monkeypatch):
    """A preempted worker announced itself; the survivor (DeepSpeed rank 1 here: not the rank
    whose save_checkpoint writes the model file) runs ``loop.stop_alone`` after 2 of 5 steps, over
    what is left of a collective save of that step cut short, beside a ``step-N.rank-R`` left by
    another writer killed before its rename. ``loop.resume`` (the normal path) takes it into a
    fresh engine; the other 3 steps then give the uninterrupted run's lrs, weights, Adam moments,
    EMA and samples, bit for bit, and the driver was told ``preempted`` at step 2.
    Fails on: ``save_alone`` not making this rank DeepSpeed's writer (``engine.save_non_zero_checkpoint
    = True``: no model file), the private directory not renamed to the tag, the half-written leftover
    not cleared first, ``stop_alone`` not reporting the preemption, and whatever fails
    test_a_resumed_stage_continues_exactly_where_it_stopped."""
    from sdn_dist.training import loop
    from sdn_dist.training.checkpoint import Checkpointer
    cfg = _run_cfg(tmp_path, 1)
    micro = cfg.micro_batch_at(1)
    _, teacher = _models(cfg)

    fresh = lambda: _fresh_run(cfg, cfg.stage1)   # noqa: E731

    state, engine, averaged = fresh()
    feed, want_lrs = FakeFeed(cfg, micro), []
    _steps(5, engine, teacher, feed, state, averaged, cfg, want_lrs)
    want = (engine.module.state_dict(), averaged.module.state_dict(), feed.drawn, engine.optimizer.state_dict())

    state, engine, averaged = fresh()
    feed, lrs = FakeFeed(cfg, micro), []
    _steps(2, engine, teacher, feed, state, averaged, cfg, lrs)
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)          # rank 0's collective save of this step, cut short
    (root / "step-00000002" / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    (root / "step-00000009.rank-00002").mkdir()           # another rank's write alone, killed before its rename
    engine.save_non_zero_checkpoint = False                # DeepSpeed rank 1
    torch.manual_seed(12345)
    sent, closed = [], []
    feed.close = preempt_close = lambda: closed.append(1)
    preempt = type("Preempt", (), {"close": staticmethod(preempt_close)})()
    loop.stop_alone(Checkpointer(cfg.out, keep=2, rank=1, world_size=2, report=sent.append), engine, averaged, state,
                    type("Collector", (), {"report": _Remote(sent)})(), 1, preempt, feed)
    rng_after_save = torch.rand(8)
    drawn = feed.drawn
    events = [r for batch in sent for r in batch]
    assert [(e["event"], e["step"], e["rank"]) for e in events if e["event"] in ("preempted", "checkpoint")] == [
        ("checkpoint", 2, 1), ("preempted", 2, 1)]
    assert json.loads((root / "step-00000002" / "COMPLETE").read_text())["alone"] == 1
    assert closed == [1, 1]
    del state, engine, averaged, feed

    monkeypatch.setattr(loop, "build_engine", FakeEngine)
    spec = type("Spec", (), {"text_dim": cfg.text.dim, "text_stats": None})()
    state, engine, averaged = loop.resume(cfg, Checkpointer(cfg.out, keep=2), 0, 1, spec, torch.device("cpu"))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert torch.equal(torch.rand(8), rng_after_save)
    assert (state.step, state.stage, state.data_position) == (2, 1, 2 * 2 * micro)
    feed = FakeFeed(cfg, micro, start=state.data_position)
    _steps(3, engine, teacher, feed, state, averaged, cfg, lrs)
    assert lrs == want_lrs
    assert drawn + feed.drawn == want[2]
    for got, ref in ((engine.module.state_dict(), want[0]), (averaged.module.state_dict(), want[1])):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    moments = engine.optimizer.state_dict()["state"]
    assert moments.keys() == want[3]["state"].keys()
    for i, m in moments.items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(m[k], want[3]["state"][i][k], rtol=0, atol=0, msg=f"{i}.{k}")


def test_a_survivors_checkpoint_to_a_remote_out_holds_its_files(tmp_path):
    """A remote ``out`` (fsspec's memory:// standing in for s3://): ``save_alone`` writes in local
    staging, uploads each file under ``step-N/``, then ``COMPLETE``; ``Checkpointer.load`` (the
    resume path: download, verify_safe, load) gives the survivor's weights, Adam moments and EMA.
    Fails on: the files not uploaded (a COMPLETE over nothing), uploaded under another name."""
    from sdn_dist.training import loop
    from sdn_dist.training.checkpoint import Checkpointer
    cfg = _run_cfg(tmp_path, 1)
    _, teacher = _models(cfg)
    state, engine, averaged = _fresh_run(cfg, cfg.stage1)
    _steps(2, engine, teacher, FakeFeed(cfg, cfg.micro_batch_at(1)), state, averaged, cfg, [])
    out = f"memory://alone-{tmp_path.name}/run"
    engine.save_non_zero_checkpoint = False
    tag = Checkpointer(out, keep=2, rank=1, world_size=2).save_alone(engine, 2, loop._states(state, averaged))
    ck = Checkpointer(out, keep=2)
    assert [i["tag"] for i in ck.complete()] == [tag] == ["step-00000002"]
    assert sorted(p.rsplit("/", 1)[-1] for p in ck.fs.ls(f"{ck.path}/{tag}", detail=False)) == [
        "COMPLETE", "mp_rank_00_model_states.pt"]
    _, b, b_avg = _fresh_run(cfg, cfg.stage1)
    saved = ck.load(b, tag, {"ema": b_avg})
    assert saved["train"]["step"] == 2
    for got, ref in ((b.module.state_dict(), engine.module.state_dict()),
                     (b_avg.module.state_dict(), averaged.module.state_dict())):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    for i, m in engine.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(b.optimizer.state_dict()["state"][i]["exp_avg_sq"], m["exp_avg_sq"], rtol=0, atol=0)


class _Preempt:
    """WorkerPreemption as the loop's stop paths use it: whether this rank writes alone."""

    def __init__(self, alone):
        self.alone, self.closed = alone, 0

    def writes_alone(self, world_size, wait_seconds=0.0):
        return self.alone

    def close(self):
        self.closed += 1


def test_a_peer_lost_mid_step_leaves_the_step_before_it(tmp_path, monkeypatch):
    """The preempted peer is SIGKILLed before the survivor reached a step boundary after its
    announcement (a step longer than the 2 s between SIGTERM and SIGKILL): step 3's gradient
    all-reduce raises on the survivor after the step drew its samples and random numbers.
    ``loop.after_peer_loss`` checkpoints step 2 (the weights are still step 2's: DeepSpeed
    all-reduces before the optimizer update), with step 2's data position and RNGs from
    ``loop.boundary``; the resumed run equals the uninterrupted one. Had the failing step's
    optimizer update run, nothing is written and the error goes on (Ray Train's restart); so too
    with no preemption announced. Fails on: the data position or the RNGs not put back to the
    boundary's, the optimizer-step guard dropped."""
    from sdn_dist.training import loop
    from sdn_dist.training.checkpoint import Checkpointer
    cfg = _run_cfg(tmp_path, 1)
    micro = cfg.micro_batch_at(1)
    _, teacher = _models(cfg)
    collector = type("Collector", (), {"report": _Remote([])})()

    fresh = lambda: _fresh_run(cfg, cfg.stage1)   # noqa: E731

    state, engine, averaged = fresh()
    feed, want_lrs = FakeFeed(cfg, micro), []
    _steps(5, engine, teacher, feed, state, averaged, cfg, want_lrs)
    want = (engine.module.state_dict(), averaged.module.state_dict(), feed.drawn)

    def fail_in_step_3(after_update):
        """2 steps, then step 3 raising as gloo does when the peer is gone: in its last
        micro-batch's backward (the all-reduce), or after its optimizer update."""
        state, engine, averaged = fresh()
        feed, lrs = FakeFeed(cfg, micro), []
        _steps(2, engine, teacher, feed, state, averaged, cfg, lrs)
        drawn = list(feed.drawn)
        torch.manual_seed(12345)
        before = loop.boundary(state, engine)
        next_draw = torch.rand(8)
        torch.set_rng_state(before[2]["torch"])
        real_backward, real_step = engine.backward, engine.step

        def backward(loss):
            if not after_update and (engine.micro + 1) % engine.accum == 0:
                torch.rand(3)              # the step's forward drew random numbers
                raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
            real_backward(loss)

        def step():
            real_step()
            if after_update and engine.micro % engine.accum == 0:
                raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")

        engine.backward, engine.step = backward, step
        with pytest.raises(RuntimeError, match="gloo"):
            _steps(1, engine, teacher, feed, state, averaged, cfg, lrs)
        return state, engine, averaged, feed, before, lrs, drawn, next_draw

    ck = Checkpointer(cfg.out, keep=2, rank=1, world_size=2)
    state, engine, averaged, feed, before, _, _, _ = fail_in_step_3(after_update=False)
    assert not loop.after_peer_loss(ck, engine, averaged, state, before, collector, 1, 2, _Preempt(False), feed)
    state, engine, averaged, feed, before, _, _, _ = fail_in_step_3(after_update=True)
    assert not loop.after_peer_loss(ck, engine, averaged, state, before, collector, 1, 2, _Preempt(True), feed)
    assert ck.complete() == []

    state, engine, averaged, feed, before, lrs, drawn, next_draw = fail_in_step_3(after_update=False)
    assert loop.after_peer_loss(ck, engine, averaged, state, before, collector, 1, 2, _Preempt(True), feed)
    assert [i["step"] for i in ck.complete()] == [2]
    monkeypatch.setattr(loop, "build_engine", FakeEngine)
    spec = type("Spec", (), {"text_dim": cfg.text.dim, "text_stats": None})()
    state, engine, averaged = loop.resume(cfg, Checkpointer(cfg.out, keep=2), 0, 1, spec, torch.device("cpu"))
    assert torch.equal(torch.rand(8), next_draw)
    assert (state.step, state.data_position) == (2, 2 * 2 * micro)
    feed = FakeFeed(cfg, micro, start=state.data_position)
    _steps(3, engine, teacher, feed, state, averaged, cfg, lrs)
    assert lrs == want_lrs and drawn + feed.drawn == want[2]
    for got, ref in ((engine.module.state_dict(), want[0]), (averaged.module.state_dict(), want[1])):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_at_zero_1_no_rank_checkpoints_alone(tmp_path):
    """At ZeRO >= 1 a rank holds only a partition of the optimizer state: ``save_alone`` refuses
    and writes nothing (a rerun resumes from the last regular checkpoint), and the loop never asks
    it to. The rank that writes alone is the lowest one not announced as preempted; the driver's
    SIGTERM (no rank announced) is left to the ranks' agreement.
    Fails on: dropping save_alone's ZeRO check, or the writer chosen among the announced ranks."""
    from sdn_dist.training.checkpoint import Checkpointer
    from sdn_dist.training.preemption import WorkerPreemption
    from sdn_dist.training.state import TrainState
    cfg = _run_cfg(tmp_path, 1, "deepspeed.zero_stage=1")
    engine = FakeEngine(cfg, cfg.stage1, cfg.text.dim)
    engine.zero_stage = 1
    with pytest.raises(ValueError, match="ZeRO 0"):
        Checkpointer(cfg.out, keep=2, rank=1, world_size=2).save_alone(
            engine, 3, {"train": TrainState.start(cfg.stage1, cfg.stage2, 2)})
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

    collector = type("Collector", (), {"until_preempted": type("M", (), {"remote": staticmethod(lambda: None)})()})()

    def writers(announced, world=4):
        out = []
        for r in range(world):
            p = WorkerPreemption(collector, 25.0, r)
            p._announced = announced          # what until_preempted returned
            out.append(p.writes_alone(world))
            p.close()
        return [r for r, w in enumerate(out) if w]

    assert writers([0]) == [1] and writers([1, 2]) == [0] and writers([0, 1, 3]) == [2]
    assert writers([]) == [] and writers([0, 1, 2, 3]) == []


def test_the_switch_moves_to_stage_2_with_the_same_weights_and_a_fresh_optimizer(tmp_path, monkeypatch):
    """``loop.next_stage`` after the last stage-1 step: the state is in stage 2, the new engine
    has stage 2's config (its lr), the stage-1 weights (not a fresh init) and a fresh optimizer and
    EMA. Fails on: the weights not handed over, stage 1's config kept, the stage not advanced, the
    stage-1 EMA carried over. (build_engine itself loading them at every ZeRO stage:
    tests/test_checkpoint.py.)"""
    from sdn_dist.training import loop
    from sdn_dist.training.state import TrainState
    cfg = _cfg("workers=1", "data.batch_size=4", "stage1.steps=2", "stage2.steps=3", "stage1.lr=0.01",
               "stage2.lr=0.002", "ema.decay=0.5", f"out={tmp_path / 'run'}")
    _, teacher = _models(cfg)
    state = TrainState.start(cfg.stage1, cfg.stage2, 1)
    engine = FakeEngine(cfg, cfg.stage1, cfg.text.dim)
    averaged = loop.average(engine.module, cfg.ema.decay)
    _steps(2, engine, teacher, FakeFeed(cfg, cfg.micro_batch_at(1)), state, averaged, cfg, [])
    assert state.schedule.switches_after(state.step, state.stage)
    trained = {k: v.clone() for k, v in engine.module.state_dict().items()}
    monkeypatch.setattr(loop, "build_engine", FakeEngine)
    spec = type("Spec", (), {"text_dim": cfg.text.dim, "text_stats": None})()
    new, new_avg = loop.next_stage(cfg, state, spec, torch.device("cpu"), loop.student_state_dict(engine))
    assert state.stage == 2 and new.stage_cfg == cfg.stage2 and new.get_lr() == [0.002]
    assert not new.optimizer.state                                   # no moments carried over
    fresh = FakeEngine(cfg, cfg.stage2, cfg.text.dim).module.state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)   # stage 1 moved the weights
    for k, v in trained.items():
        torch.testing.assert_close(new.module.state_dict()[k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(new_avg.module.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert int(new_avg.n_averaged) == 0                              # stage 2 averages its own weights


def test_data_position_counts_every_slot_drawn_with_grad_accum():
    """With deepspeed.grad_accum = 2 a step draws two micro-batches: the position advances by both,
    bad (skipped) slots and an all-bad micro-batch included, so a resume starts at the next slot.
    The step's loss is the mean of its micro-batches' losses.
    Fails on: a position advanced by one micro-batch per step (grad_accum forgotten), by the good
    samples only, or not at all for an all-bad micro-batch; the micro-batch losses summed, not
    averaged."""
    from sdn_dist.training.loop import distill_step, prepare_batch, train_step
    from sdn_dist.training.state import TrainState
    cfg = _cfg("workers=1", "data.batch_size=8", "deepspeed.grad_accum=2")
    micro = cfg.micro_batch_at(1)
    assert micro == 4
    student, teacher = _models(cfg)
    engine = FakeEngine(cfg, cfg.stage1, cfg.text.dim)
    state = TrainState.start(cfg.stage1, cfg.stage2, 1)
    feed = FakeFeed(cfg, micro, bad={1, 2, 8, 9, 10, 11})     # slots 8-11: a whole micro-batch bad
    # the step's loss is the mean over its micro-batches (the weights move only after both)
    ahead = FakeFeed(cfg, micro, bad=feed.bad)
    want = sum(distill_step(teacher, engine.module, *prepare_batch(b.image, b.text, "cpu", torch.float32), stages(cfg.stage1, cfg.stage2)[0])[0]
               for b in (ahead.next(), ahead.next())) / 2
    loss, _, good = train_step(engine, teacher, feed, state, cfg.text.dim, cfg.deepspeed.grad_accum, cfg.autocast)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=0)
    assert good == 2 * micro - 2
    for _ in range(2):
        train_step(engine, teacher, feed, state, cfg.text.dim, cfg.deepspeed.grad_accum, cfg.autocast)
    assert state.step == 3 and state.data_position == 3 * 2 * micro == feed.position
    assert feed.drawn == [k for k in range(24) if k not in feed.bad]


# ------------------------------------------------------------------------------- interrupted checkpoints

def test_an_interrupted_checkpoint_is_never_resumed_and_is_removed(tmp_path):
    """A step directory without COMPLETE (a save killed mid-write) is not the latest checkpoint and
    ``clean_incomplete`` removes it, leaving complete ones and anything else alone; on a local
    directory, without Ray or DeepSpeed.
    Fails on: clean_incomplete removing nothing (or the complete ones), latest() taking a step
    directory without its marker."""
    from sdn_dist.training.checkpoint import Checkpointer
    root = tmp_path / "run" / "checkpoints"
    for tag in ("step-00000002", "step-00000004", "step-00000006"):
        (root / tag).mkdir(parents=True)
        (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for tag, step in (("step-00000002", 2), ("step-00000004", 4)):
        (root / tag / "COMPLETE").write_text(json.dumps({"step": step, "stage": 1}))
    (root / "notes").mkdir()
    ck = Checkpointer(str(tmp_path / "run"), keep=2)
    assert ck.latest()["tag"] == "step-00000004"
    assert ck.clean_incomplete() == ["step-00000006"]
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-00000002", "step-00000004"]
    assert ck.clean_incomplete() == []


# ------------------------------------------------------------------------------- preflight

@pytest.mark.parametrize("stage", [1, 2])
def test_preflight_rejects_an_unknown_point_name_in_either_stage(tmp_path, stage):
    """``sdn-dist train`` stops before Ray on a point name that is not a matched point, naming the
    key, in stage 1 as in stage 2. Fails on: preflight not checking one stage's point names."""
    from sdn_dist.errors import ConfigError
    from sdn_dist.training import preflight
    cfg = _cfg(f"stage{stage}.point_weights.conv9_9=2", f"out={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=rf"'stage{stage}\.point_weights\.conv9_9'"):
        preflight.run(cfg)
    preflight.check_config(_cfg(f"stage{stage}.point_weights.conv3_3=2"))   # a known one passes


def test_a_checkpoint_of_the_previous_layout_loads_under_the_same_names():
    """Checkpoints written before every state had its own name kept the train state under "sdn"
    and the RNG and EMA under "sdn_tensors"; they resume as the same named states. Fails on: the
    old layout read as new (the train state and the EMA lost)."""
    from sdn_dist.training.checkpoint import _saved_states
    rng, ema = torch.get_rng_state(), {"n_averaged": torch.tensor(3)}
    old = _saved_states({"sdn": {"step": 4, "stage": 1}, "sdn_tensors": {"rng": rng, "ema": ema}})
    assert old == {"train": {"step": 4, "stage": 1}, "rng": rng, "ema": ema}
    assert _saved_states({"sdn": {"train": {"step": 4}}}) == {"train": {"step": 4}}
