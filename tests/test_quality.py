"""Training features for image quality: TensorBoard event files and the per-stage learning-rate
schedule, on one real debug run (real Ray, real DeepSpeed; slow tier), plus TensorBoard to a remote
``out`` through fsspec (fast).

    PYTHONPATH=$PWD python -m pytest tests/test_quality.py -q
"""

import glob
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

SDN = [sys.executable, "-m", "sdn_dist"]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
LR = 1e-3            # the debug preset's rate in both stages
STAGE = 8            # debug: 8 + 8 steps
WARMUP = 3


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def _train(out, shards):
    sets = [f"out={out}", f"data.train={shards}/train-*.tar", f"data.test={shards}/test-*.tar",
            "metrics.tensorboard=true", "samples.every=4",
            "stage2.lr_schedule=warmup_cosine", f"stage2.warmup_steps={WARMUP}",
            "checkpoint.keep=100"]   # debug: a checkpoint every 4 steps
    r = subprocess.run(SDN + ["train", "--preset", "debug", "--quiet"] + [a for s in sets for a in ("--set", s)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sdn_dist.apps.synth.dataset import make_synth
    d = tmp_path_factory.mktemp("q-shards")
    make_synth(out=str(d), train=40, test=8, size=32, per_shard=40, seed=2, progress=False)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("q-run") / "run"
    _train(out, shards)
    return out


@pytest.mark.slow
def test_tensorboard_event_files_hold_losses_throughput_and_grids(run):
    files = glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    ea = _events(run / "tensorboard")
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["rank"] == 0]
    assert [r["step"] for r in recs] == list(range(1, 2 * STAGE + 1))
    # Every logged step's total loss, each matched point's loss and the throughput, as in metrics.jsonl.
    points = sorted(k for k in recs[0] if k.startswith("loss/"))
    assert len(points) >= 5
    for tag in ["loss", "samples_per_sec", *points]:
        got = {e.step: e.value for e in ea.Scalars(tag)}
        assert got == pytest.approx({r["step"]: r[tag] for r in recs}, rel=1e-5), tag
    # The sample grids, once per written step, as the PNGs in samples/.
    images = ea.Images("samples")
    assert [e.step for e in images] == [4, 8, 12, 16]
    for e in images:
        png = Image.open(io.BytesIO(e.encoded_image_string))
        ref = Image.open(run / "samples" / f"step-{e.step:08d}.png")
        assert png.size == ref.size and list(png.convert("RGB").getdata()) == list(ref.convert("RGB").getdata())


def _expected_lr(k: int) -> float:
    """Rate after the k-th optimizer step of stage 2 (DeepSpeed WarmupCosineLR, linear warm-up
    from 0, cosine to 0): iteration i = k - 1."""
    i = k - 1
    if i < WARMUP:
        return LR * i / WARMUP
    progress = min(1.0, (i - WARMUP + 1) / (STAGE - WARMUP))
    return LR * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.slow
def test_stage_lr_schedule_followed_and_checkpointed(run):
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["rank"] == 0]
    lrs = {r["step"]: r["lr"] for r in recs}      # the engine's rate after each step
    assert sorted(lrs) == list(range(1, 2 * STAGE + 1))
    # Stage 1: constant (the default, the paper's method).
    assert all(lrs[s] == LR for s in range(1, STAGE + 1))
    # Stage 2: warm-up then cosine decay to 0 over the stage's 8 steps.
    got = [lrs[STAGE + k] for k in range(1, STAGE + 1)]
    assert got == pytest.approx([_expected_lr(k) for k in range(1, STAGE + 1)], abs=1e-12)
    assert max(got) > 0.8 * LR and got[-1] < 0.01 * LR and got[1] < got[2] < got[3]
    # TensorBoard plots the same rate.
    assert {e.step: e.value for e in _events(run / "tensorboard").Scalars("lr")} == pytest.approx(lrs, rel=1e-6)
    # The scheduler's position is in DeepSpeed's checkpoint (so a resumed stage continues the curve).
    sched = {}
    for step in (4, 12):
        f = glob.glob(str(run / "checkpoints" / f"step-{step:08d}" / "**" / "mp_rank_00_model_states.pt"), recursive=True)
        sched[step] = torch.load(f[0], map_location="cpu", weights_only=False).get("lr_scheduler")
    assert not sched[4] and sched[12] == {"last_batch_iteration": 12 - STAGE - 1}


@pytest.mark.slow
def test_a_resumed_stage_continues_its_lr_curve(run, shards, tmp_path):
    """The run again from its step-12 checkpoint (mid-way through stage 2's warm-up + cosine):
    steps 13-16 get the uninterrupted run's rates, not a restarted curve."""
    import shutil
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000016")
    _train(resumed, shards)
    recs = [r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines()) if r["rank"] == 0]
    first = {r["step"]: r["lr"] for r in recs if r["attempt"] == recs[0]["attempt"]}
    again = {r["step"]: r["lr"] for r in recs if r["attempt"] != recs[0]["attempt"]}
    assert sorted(again) == [13, 14, 15, 16]
    assert again == pytest.approx({s: first[s] for s in again}, abs=1e-12)


def test_tensorboard_to_remote_out_uploads_event_files(tmp_path):
    """``out`` on an object store (fsspec's in-memory one here): written locally, uploaded."""
    import fsspec

    from sdn_dist.config import MetricsConfig
    from sdn_dist.training.grids import grid_png
    from sdn_dist.training.metrics import MetricsSink
    out = "memory://tb-remote/run"
    fs = fsspec.filesystem("memory")
    fs.pipe("/tb-remote/run/samples/step-00000002.png", grid_png(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)))
    sink = MetricsSink(out, MetricsConfig(tensorboard=True), "r", "a1")
    sink.log([{"step": s, "stage": 1, "rank": 0, "loss": 1.0 / s, "loss/conv1_1": 0.5 / s,
               "samples_per_sec": 100.0 + s} for s in (1, 2)]
             + [{"step": 2, "stage": 1, "rank": 1, "loss": 9.0}]   # other ranks: not plotted
             + [{"event": "samples", "step": 2, "stage": 1, "rank": 0, "url": f"{out}/samples/step-00000002.png"}])
    sink.close()
    names = fs.ls("/tb-remote/run/tensorboard", detail=False)
    assert len(names) == 1 and "events.out.tfevents" in names[0]
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / names[0].rsplit("/", 1)[1]).write_bytes(fs.cat_file(names[0]))
    ea = _events(tmp_path / "tb")
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
    assert [e.step for e in ea.Scalars("loss/conv1_1")] == [1, 2]
    assert [e.step for e in ea.Images("samples")] == [2]
    assert not os.path.exists(sink.tb.dir)   # the local staging folder is removed
