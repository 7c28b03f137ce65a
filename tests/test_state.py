"""TrainState and StageSchedule: what a checkpoint holds and when stage 1 ends (fast, pure)."""

import json
import math

import pytest
import torch

from sdn_dist.config import load_config
from sdn_dist.errors import UserError
from sdn_dist.training.state import RNG, StageSchedule, TrainState


def cfg(*sets):
    return load_config("debug", overrides=list(sets))


def _stages(c):
    return c.stage1, c.stage2


def test_fixed_switch_and_end_follow_the_config():
    s = StageSchedule.from_stages(*_stages(cfg("stage1.steps=10", "stage2.steps=5")))
    assert (s.switch_step, s.end) == (10, 15)
    assert [s.stage_at(k) for k in (0, 9, 10, 14)] == [1, 1, 2, 2]
    # without the plateau rule, no loss moves the switch
    assert not any(s.observe(k, 100.0 + k) for k in range(1, 10)) and s.switch_step == 10


def test_plateau_ends_stage_one_after_patience_logged_steps_without_improvement():
    s = StageSchedule.from_stages(*_stages(cfg("stage1.steps=100", "stage2.steps=7",
                                      "stage1.plateau.patience=2", "stage1.plateau.min_delta=0.1")))
    assert not s.observe(1, 1.0)        # best
    assert not s.observe(2, 0.95)       # not better by min_delta: bad 1
    assert not s.observe(3, 0.5)        # better: bad 0
    assert not s.observe(4, 0.45)       # bad 1
    assert s.observe(5, 0.46)           # bad 2 = patience: stage 1 ends here
    assert (s.switch_step, s.end, s.stage_at(5)) == (5, 12, 2)
    assert not s.observe(6, 10.0) and s.switch_step == 5   # decided stays decided
    assert [s.switches_after(k, 1) for k in (4, 5)] == [False, True]   # the loop switches right there


def test_the_schedule_alone_says_when_the_engine_switches_and_what_each_stage_is():
    """The loop asks the schedule: an engine in stage 1 switches after the switch step and only
    then; an engine in stage 2 never does. Each Stage carries its own config section and loss, and
    only stage 2 goes through the teacher. Fails on: the switch a step early or late, a stage-2
    engine switching again, stage 2 handed stage 1's config or not going through the teacher."""
    from sdn_dist.model.losses import stage1_loss, stage2_loss
    c = cfg("stage1.steps=10", "stage2.steps=5")
    s = StageSchedule.from_stages(c.stage1, c.stage2)
    assert [k for k in range(16) if s.switches_after(k, 1)][:1] == [10]
    assert not any(s.switches_after(k, 2) for k in range(10, 16))
    one, two = s.stage(1), s.stage(2)
    assert (one.number, one.config, one.loss, one.through_teacher) == (1, c.stage1, stage1_loss, False)
    assert (two.number, two.config, two.loss, two.through_teacher) == (2, c.stage2, stage2_loss, True)


def restored(saved: dict, c, world_size: int) -> TrainState:
    """A checkpoint's train state loaded by a run with config ``c`` on ``world_size`` workers,
    through JSON as the COMPLETE marker stores it."""
    state = TrainState.start(c.stage1, c.stage2, world_size)
    state.load_state_dict(json.loads(json.dumps(saved)))
    return state


def test_state_round_trips_through_json_and_keeps_what_was_decided():
    """Fails on: a field left out of state_dict or load_state_dict, the plateau's memory lost."""
    c = cfg("stage1.steps=100", "stage2.steps=7", "stage1.plateau.patience=1", "stage1.plateau.min_delta=1e9")
    state = TrainState.start(c.stage1, c.stage2, world_size=2)
    state.schedule.observe(3, 1.0)
    assert state.schedule.observe(4, 1.0)          # plateau at 4
    state.step, state.data_position = 4, 16
    back = restored(state.state_dict(), c, world_size=2)
    assert (back.step, back.stage, back.data_position, back.world_size) == (4, 1, 16, 2)
    assert back.schedule.switch_step == 4 and back.schedule.end == 11
    assert (back.schedule.best, back.schedule.bad) == (state.schedule.best, state.schedule.bad) == (1.0, 1)


def test_a_rerun_with_more_steps_extends_the_run_but_not_a_finished_stage_one():
    c = cfg("stage1.steps=10", "stage2.steps=10")
    state = TrainState.start(c.stage1, c.stage2, world_size=1)
    state.step, state.stage = 15, 2
    longer = restored(state.state_dict(), cfg("stage1.steps=50", "stage2.steps=30"), world_size=1)
    assert longer.schedule.switch_step == 10 and longer.schedule.end == 40
    early = TrainState.start(c.stage1, c.stage2, 1)
    early.step = 5
    longer = restored(early.state_dict(), cfg("stage1.steps=50"), 1)
    assert longer.schedule.switch_step == 50     # stage 1 had not ended: the new length applies


def test_world_size_change_keeps_the_global_data_position():
    """The position counts the global stream (issue 34): a resume at another world size continues
    it where it was, unscaled. A checkpoint of the per-rank era (no ``data_order``) counted one
    rank's samples: it becomes the samples drawn in all. Fails on: a restore that rescales the
    position by the world sizes, or one that takes an old per-rank position as global."""
    c = cfg()
    state = TrainState.start(c.stage1, c.stage2, world_size=2)
    state.step, state.data_position = 10, 80      # 10 steps of a global batch of 8
    saved = state.state_dict()
    assert saved["data_order"] == "global"
    for world in (1, 2, 3):
        back = restored(saved, c, world_size=world)
        assert (back.data_position, back.world_size) == (80, world)
    old = {k: v for k, v in saved.items() if k != "data_order"} | {"data_position": 40}   # 40 per rank
    for world in (1, 2):
        assert restored(old, c, world_size=world).data_position == 80


def test_checkpoint_of_an_older_release_is_a_user_error():
    with pytest.raises(UserError, match="older sdn-dist"):
        restored({"step": 4, "stage": 1, "switch_step": 8}, cfg(), 1)


def test_rng_capture_and_restore():
    torch.manual_seed(3)
    saved = RNG.state_dict()
    a = torch.rand(4)
    torch.rand(10)
    RNG.load_state_dict(saved)
    assert torch.equal(torch.rand(4), a)
    assert math.isinf(StageSchedule.from_stages(*_stages(cfg())).best)
