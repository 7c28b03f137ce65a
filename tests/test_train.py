"""The distributed trainer end to end: real Ray (embedded), real DeepSpeed, real shards (slow tier)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SDN = [sys.executable, "-m", "sdn_dist"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sdn_dist.data.synth import make_synth as write_synth
    d = tmp_path_factory.mktemp("shards")
    # 3 training shards of uneven size (40, 40, 25): an odd count over 2 workers.
    write_synth(out=str(d), train=105, test=16, size=32, per_shard=40, seed=1)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """16 samples: each rank sees the same 8 every epoch, so a falling loss is learning, not batch luck."""
    from sdn_dist.data.synth import make_synth
    d = tmp_path_factory.mktemp("tiny")
    make_synth(out=str(d), train=16, test=8, size=32, per_shard=16, seed=2)
    return d


def train(out, shards, *sets, timeout=600, check=True):
    args = SDN + ["train", "--preset", "debug", "--quiet", "--set", f"out={out}",
                  "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def events(out):
    p = Path(out) / "events.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def student(out):
    blob = torch.load(Path(out) / "export" / "student.pt", weights_only=True)
    return blob["state_dict"]


def test_two_workers_two_stages(tmp_path, tiny):
    out = tmp_path / "run"
    train(out, tiny, "workers=2", "data.shuffle=false", "stage1.steps=30", "stage2.steps=30", "checkpoint.every=10")
    recs = records(out)
    for rank in (0, 1):
        mine = sorted((r for r in recs if r["rank"] == rank), key=lambda r: r["step"])
        assert [r["step"] for r in mine] == list(range(1, 61))
        # the switch at the configured step, on every rank
        assert all(r["stage"] == 1 for r in mine if r["step"] <= 30)
        assert all(r["stage"] == 2 for r in mine if r["step"] > 30)
        for stage in (1, 2):
            losses = [r["loss"] for r in mine if r["stage"] == stage]
            assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (stage, losses)
        assert all({"step", "stage", "loss", "samples_per_sec"} <= set(r) for r in mine)
    finals = [e for e in events(out) if e["event"] == "final"]
    assert len(finals) == 2 and finals[0]["param_sha256"] == finals[1]["param_sha256"]
    assert finals[0]["step"] == 60
    assert (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png"))
    done = sorted(p.parent.name for p in (out / "checkpoints").glob("*/COMPLETE"))
    assert done and done[-1] == "step-00000060" and len(done) <= 2


def _kill_worker_when(out, predicate, timeout=300):
    """Poll metrics.jsonl; SIGKILL the rank-0 worker process once predicate(record) holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = Path(out) / "metrics.jsonl"
        if p.exists():
            for r in map(json.loads, p.read_text().splitlines()):
                if predicate(r):
                    os.kill(r["pid"], signal.SIGKILL)
                    return r
        time.sleep(0.2)
    raise AssertionError("the run never reached the kill point")


@pytest.mark.parametrize("kill_stage", [1, 2])
def test_sigkill_worker_resumes_in_right_stage_and_matches_uninterrupted(tmp_path, shards, kill_stage):
    sets = ["workers=2", "stage1.steps=12", "stage2.steps=12", "checkpoint.every=4",
            "data.shuffle=false"]
    ref = tmp_path / "ref"
    train(ref, shards, *sets)

    out = tmp_path / "killed"
    args = SDN + ["train", "--preset", "debug", "--quiet", "--set", f"out={out}",
                  "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lo = 5 if kill_stage == 1 else 17
        killed = _kill_worker_when(out, lambda r: r["stage"] == kill_stage and r["step"] >= lo and r["rank"] == 0)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert killed["stage"] == kill_stage
    recs = records(out)
    final = [e for e in events(out) if e["event"] == "final"]
    assert {e["step"] for e in final} == {24}          # the configured total, not more
    resumed = [e for e in events(out) if e["event"] == "message" and "resumed from" in e["text"]]
    assert resumed, events(out)
    # in the right stage: after the restart, steps <= 12 are stage 1, later ones stage 2
    assert all((r["stage"] == 1) == (r["step"] <= 12) for r in recs)
    a, b = student(ref), student(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_zero3_partitioned_two_workers_grad_accum_clip_and_user_json(tmp_path, tiny):
    """One short run over the paths the debug preset leaves off: ZeRO-3 with its weights really
    partitioned over 2 ranks (a user DeepSpeed JSON sets the persistence threshold to 0; by default
    DeepSpeed keeps tensors this small whole), grad_accum=2, grad_clip, the stage switch's
    weights-only load of a ZeRO-3 checkpoint and the sample grid (a forward every rank joins)."""
    from sdn_dist.model.student import Student
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "run"
    train(out, tiny, "workers=2", "deepspeed.zero_stage=3", "deepspeed.grad_accum=2", "deepspeed.grad_clip=1.0",
          f"deepspeed.config={ds}", "stage1.steps=4", "stage2.steps=4", "checkpoint.every=2", timeout=900)
    recs = records(out)
    for rank in (0, 1):
        mine = sorted((r for r in recs if r["rank"] == rank), key=lambda r: r["step"])
        assert [(r["step"], r["stage"]) for r in mine] == [(s, 1 if s <= 4 else 2) for s in range(1, 9)]
    assert any("switched to stage 2 at step 4" in e.get("text", "") for e in events(out))
    # each rank saved its own partition
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000008").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert (out / "samples" / "step-00000004.png").exists() and (out / "samples" / "step-00000008.png").exists()
    # every rank gathered the same full weights; the export holds them whole
    finals = [e for e in events(out) if e["event"] == "final"]
    assert len(finals) == 2 and finals[0]["param_sha256"] == finals[1]["param_sha256"]
    sd = student(out)
    ref = Student(load_config_of(out).model, 32).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    assert h.hexdigest() == finals[0]["param_sha256"]


def load_config_of(out):
    import yaml

    from sdn_dist.config import Config
    return Config.model_validate(yaml.safe_load((Path(out) / "config.yaml").read_text()))
