"""Checkpoints through real DeepSpeed engines, in this process (slow tier: ~15 s, most of it
DeepSpeed's first start).

One gloo process group of world size 1; the engines are the ones the training loop builds
(``loop.build_engine`` from a real config), saved and loaded with the product's ``Checkpointer``.
The two-worker path (Ray Train, partitioned ZeRO-3 over 2 ranks, grad_accum) is tested end to end
in tests/test_train.py.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist

from sdn_dist.config import load_config
from sdn_dist.errors import UserError
from sdn_dist.training.checkpoint import Checkpointer
from sdn_dist.training.loop import build_engine, student_state_dict
from sdn_dist.training.state import RNG

pytestmark = pytest.mark.slow

TEXT_DIM = 32


@pytest.fixture(scope="module", autouse=True)
def _one_process_group(process_group):
    """Every test here runs DeepSpeed in this process (conftest.process_group: gloo, world 1)."""
    yield


def config(tmp_path, *sets):
    return load_config("debug", overrides=["workers=1", f"out={tmp_path / 'run'}", *sets])


def one_step(engine, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = engine(torch.randn(4, TEXT_DIM, generator=g))
    engine.backward(sum(v.float().square().mean() for v in out.values()))
    engine.step()


def zero3_partitioned(tmp_path):
    """A user DeepSpeed JSON that makes ZeRO-3 partition even the debug model's small tensors
    (DeepSpeed keeps tensors under 1e5 elements whole by default)."""
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return [f"deepspeed.config={f}"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_checkpoint_round_trip_through_the_allow_list(tmp_path, stage):
    """Real ZeRO-0..3 files pass verify_safe's allow-list (Checkpointer.load calls it) and restore
    weights and optimizer state: the next step from the loaded engine equals the original's."""
    cfg = config(tmp_path, f"deepspeed.zero_stage={stage}", *(zero3_partitioned(tmp_path) if stage == 3 else []))
    a = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    if stage == 3:   # partitioned: the module holds empty placeholders
        assert a.module.fc7.weight.numel() == 0
        assert a.module.state_dict()["fc7.weight"].numel() == 0
    one_step(a)
    ck = Checkpointer(cfg.out, keep=2)
    rng = torch.get_rng_state()
    tag = ck.save(a, 1, {"train": {"stage": 1}, "rng": RNG})
    b = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    torch.rand(5)                          # the generator moves on; the load puts it back
    saved = ck.load(b, tag, {"rng": RNG}, module_only=False)
    assert saved["train"] == {"stage": 1} and torch.equal(torch.get_rng_state(), rng)
    one_step(a, seed=1)
    one_step(b, seed=1)
    sa, sb = student_state_dict(a), student_state_dict(b)
    assert sa["fc7.weight"].numel() > 0 and sa.keys() == sb.keys()   # ZeRO-3: full tensors
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_checkpoint_written_alone_is_what_deepspeed_loads(tmp_path, stage):
    """``Checkpointer.save_alone`` on a real engine, as a rank that is not DeepSpeed's writer (a
    survivor other than rank 0): at ZeRO 0 ``load`` (verify_safe, then DeepSpeed's own
    load_checkpoint) restores weights, optimizer and RNG, and the next step equals the original's;
    at ZeRO 1 it refuses and writes nothing. Fails on: DeepSpeed's file not written by this rank,
    the ZeRO check dropped."""
    cfg = config(tmp_path, f"deepspeed.zero_stage={stage}")
    a = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    one_step(a)
    a.save_non_zero_checkpoint = False        # as on DeepSpeed rank 1
    ck = Checkpointer(cfg.out, keep=2, rank=1, world_size=2)
    if stage:
        with pytest.raises(ValueError, match="ZeRO 0"):
            ck.save_alone(a, 1, {"train": {"stage": 1}, "rng": RNG})
        assert not os.path.isdir(ck.local_root) or not os.listdir(ck.local_root)
        return
    rng = torch.get_rng_state()
    tag = ck.save_alone(a, 1, {"train": {"stage": 1}, "rng": RNG})
    assert a.save_non_zero_checkpoint is False   # put back
    assert [i["tag"] for i in ck.complete()] == [tag] == ["step-00000001"]
    b = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    torch.rand(5)
    saved = Checkpointer(cfg.out, keep=2).load(b, tag, {"rng": RNG}, module_only=False)
    assert saved["train"] == {"stage": 1} and torch.equal(torch.get_rng_state(), rng)
    one_step(a, seed=1)
    one_step(b, seed=1)
    sa, sb = student_state_dict(a), student_state_dict(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_zero3_weights_only_load_for_the_stage_switch(tmp_path):
    """The stage switch loads a stage-1 checkpoint's weights under a fresh optimizer; DeepSpeed's
    ZeRO-3 path for that reads the tag from a `latest` file the checkpoints do not have."""
    cfg = config(tmp_path, "deepspeed.zero_stage=3", *zero3_partitioned(tmp_path))
    a = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    one_step(a)
    ck = Checkpointer(cfg.out, keep=2)
    tag = ck.save(a, 3, {"train": {"stage": 1}})
    b = build_engine(cfg, cfg.stage2, TEXT_DIM, torch.device("cpu"))
    ck.load(b, tag, {}, module_only=True)
    sa, sb = student_state_dict(a), student_state_dict(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_zero3_consolidated_state_dict_is_the_full_model(tmp_path):
    from sdn_dist.model.student import Student
    cfg = config(tmp_path, "deepspeed.zero_stage=3", *zero3_partitioned(tmp_path))
    engine = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    torch.manual_seed(cfg.seed)   # build_engine's init: the same seed gives the same weights
    ref = Student(cfg.model, TEXT_DIM).state_dict()
    sd = student_state_dict(engine)
    assert sd.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k].float(), msg=k)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_deepspeed_checkpoint_is_refused_by_checkpointer_load(tmp_path):
    """A complete checkpoint whose model file carries a pickled call: Checkpointer.load refuses
    it, naming the file, before DeepSpeed (which unpickles with weights_only=False) opens it."""
    cfg = config(tmp_path)
    engine = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    ck = Checkpointer(cfg.out, keep=2)
    tag = ck.save(engine, 4, {"train": {"stage": 1}})
    f = tmp_path / "run" / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    blob = torch.load(f, weights_only=False)  # noqa: S614 - our own file, just written
    marker = tmp_path / "pwned"
    blob["x"] = _Evil(marker)
    torch.save(blob, f)
    assert ck.latest()["tag"] == tag          # it is complete: resume would pick it
    with pytest.raises(UserError, match=r"mp_rank_00_model_states\.pt: it references (posix|os)\.system"):
        ck.load(engine, tag, {}, module_only=False)
    assert not marker.exists()


@pytest.mark.parametrize("clip, user_json, moves", [(0.0, None, True), (1e-12, None, False), (0.0, {"gradient_clipping": 1e-12}, False)])
def test_grad_clip_and_user_json_reach_the_optimizer(tmp_path, clip, user_json, moves):
    """Adam's first step moves every weight by ~lr whatever the gradient's size; with the gradient
    clipped to norm 1e-12 (far below Adam's eps) the step all but vanishes. The same clip given in
    a user DeepSpeed JSON (deepspeed.config) overrides the generated key."""
    extra = []
    if user_json:
        (tmp_path / "user.json").write_text(json.dumps(user_json))
        extra = [f"deepspeed.config={tmp_path / 'user.json'}"]
    cfg = config(tmp_path, f"deepspeed.grad_clip={clip}", *extra)
    engine = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    before = student_state_dict(engine)
    one_step(engine)
    after = student_state_dict(engine)
    step = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert (step > 0.5 * cfg.stage1.lr) == moves, (step, cfg.stage1.lr)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_switch_hands_the_weights_over_in_memory_as_a_weights_only_load_would(tmp_path, stage):
    """The stage switch builds the stage-2 engine from the stage-1 weights in memory
    (``build_engine(..., weights=)``), with no checkpoint read. It must be what loading the switch's
    checkpoint weights-only gives: the same weights, and the same next step (so every ZeRO stage's
    optimizer starts from them, not from the fresh init). Fails on: the weights dropped or loaded
    after DeepSpeed took its fp32 copy (ZeRO 1/2 would step from the init)."""
    cfg = config(tmp_path, f"deepspeed.zero_stage={stage}", *(zero3_partitioned(tmp_path) if stage == 3 else []))
    a = build_engine(cfg, cfg.stage1, TEXT_DIM, torch.device("cpu"))
    one_step(a)
    one_step(a, seed=1)
    tag = Checkpointer(cfg.out, keep=2).save(a, 2, {"train": {"stage": 1}})
    handed = build_engine(cfg, cfg.stage2, TEXT_DIM, torch.device("cpu"), weights=student_state_dict(a))
    loaded = build_engine(cfg, cfg.stage2, TEXT_DIM, torch.device("cpu"))
    Checkpointer(cfg.out, keep=2).load(loaded, tag, {}, module_only=True)
    for engine in (handed, loaded):
        one_step(engine, seed=2)
    sa, sh, sl = student_state_dict(a), student_state_dict(handed), student_state_dict(loaded)
    assert any(not torch.equal(sa[k], sh[k]) for k in sa)         # the step moved the weights
    for k in sa:
        torch.testing.assert_close(sh[k], sl[k], rtol=0, atol=0, msg=k)
