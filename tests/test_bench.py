"""The benchmark (`sdn-dist bench`): its measurements on the debug preset, and the JSON of a tiny run.

    pytest tests/test_bench.py -m "not slow"     # the measurement functions, seconds
    pytest tests/test_bench.py                   # + a whole tiny run (real Ray, DeepSpeed), ~2 min
"""

import json
import math

import pytest
import torch

from sdn_dist.apps.bench import bench
from sdn_dist.config import load_config


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def cfg():
    return load_config("debug", overrides=["teacher.weights="])


def test_matmul_flops_is_measured():
    r = bench.matmul_flops(1, n=128, reps=2)
    assert positive(r["flops_per_sec"]) and len(r["all"]) == 2 and r["best_flops_per_sec"] >= r["flops_per_sec"]


def test_step_flops_count_both_stages(cfg):
    f1 = bench.step_flops(cfg, 1, 4, cfg.text.dim)
    f2 = bench.step_flops(cfg, 2, 4, cfg.text.dim)
    # stage 2 adds a teacher forward and its input-gradient backward on the generated image
    assert positive(f1) and f2 > f1
    assert bench.step_flops(cfg, 1, 8, cfg.text.dim) == pytest.approx(2 * f1, rel=0.01)   # linear in batch


def cycle_means(losses: list[float], n: int) -> tuple[float, float]:
    """Mean loss over the first and the last ``n`` steps: with ``n`` = the number of batches the
    loop cycles through, both windows see the same batches, so only training moves the mean."""
    assert len(losses) >= 2 * n, losses
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


@pytest.fixture(scope="module")
def batches(cfg):
    torch.manual_seed(0)
    s = cfg.model.image_size
    return [(torch.rand(8, 3, s, s), torch.randn(8, cfg.text.dim)) for _ in range(4)]


def test_plain_loop_trains(cfg, batches):
    for stage in (1, 2):
        r = bench.plain_loop(cfg, batches, stage, steps=8, n_threads=1, warmup=4)
        assert positive(r["samples_per_sec"]) and r["batch"] == 8 and len(r["losses"]) == 12
        first, last = cycle_means(r["losses"], len(batches))
        assert last < 0.97 * first, (stage, r["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
def test_data_parallel_peer_trains_in_step(cfg, batches, kind):
    """The bench's peers (2 processes, gloo on 127.0.0.1): each rank trains on its half of every
    batch, both ranks end with the same weights, and the loss over the same batches falls."""
    for stage in (1, 2):
        r = bench.run_peer(kind, cfg, batches, stage, steps=8, world=2, warmup=4, chunk=4)
        assert r["backend"] == "gloo" and r["micro_batch"] == 4 and len(r["losses"]) == 12
        assert len(r["chunk_samples_per_sec"]) == 2 and all(positive(x) for x in r["chunk_samples_per_sec"])
        first, last = cycle_means(r["losses"], len(batches))
        assert last < 0.97 * first, (kind, stage, r["losses"])
        a, b = r["param_sha256"]
        assert a == b, "the ranks' weights diverged: gradients were not averaged"


@pytest.mark.slow
def test_independent_peer_trains_without_averaging(cfg, batches):
    """The ceiling peer: the DDP loop without the all-reduce. Each rank trains (its loss falls on
    its own halves of the batches) and the ranks' weights differ, because nothing averages them;
    were it to synchronise, it would measure communication it claims not to have."""
    r = bench.run_peer("independent", cfg, batches, 1, steps=8, world=2, warmup=4, chunk=4)
    assert r["micro_batch"] == 4 and len(r["losses"]) == 12
    first, last = cycle_means(r["losses"], len(batches))
    assert last < 0.97 * first, r["losses"]
    a, b = r["param_sha256"]
    assert a != b, "the independent ranks ended with the same weights: something averaged them"


@pytest.mark.slow
def test_loader_peer_is_a_data_parallel_run_over_the_shards(tmp_path):
    """benchmarks/ddp_loader_peer.py under torchrun: both ranks read and decode their shards,
    train in step (DDP averaged every gradient: the same weights on both) and time every chunk."""
    c = load_config("debug", overrides=[f"data.train={tmp_path}/shards/train-*.tar", "teacher.weights=random"])
    bench.make_shards(tmp_path / "shards", c, 64)
    r = bench.loader_peer(c, tmp_path, steps=6, warmup=1, chunk=3)
    assert r["backend"] == "gloo" and r["world"] == 2 and r["micro_batch"] == 4
    a, b = r["param_sums"]
    assert a == b, "the ranks' weights diverged: gradients were not averaged"
    for s in ("stage1", "stage2"):
        assert len(r[s]["chunk_samples_per_sec"]) == 2 and positive(r[s]["samples_per_sec"])
        assert len(r[s]["losses"]) == 7 and all(math.isfinite(x) and x > 0 for x in r[s]["losses"])
        assert 0 <= r[s]["data_wait_fraction"] < 1


def test_paper_memory_table():
    m = bench.paper_memory(act_image_size=32)
    assert m["student_params"] == 143_789_123          # the method's ~143.8 M
    assert m["largest_layer_params"] == 4096 * 7 * 7 * 512 + 7 * 7 * 512
    for stage in ("stage1", "stage2"):
        assert positive(m["activations"][stage]["per_sample_bytes"])
    rows = {(r["world_size"], r["zero_stage"]): r for r in m["per_gpu"]}
    assert len(rows) == 16
    for w in (1, 2, 4, 8):
        states = [rows[w, z]["model_states_bytes"] for z in range(4)]
        assert all(positive(s) for s in states)
        assert states[0] == 16 * m["student_params"]
        if w > 1:   # each ZeRO stage partitions more
            assert states[1] < states[0] and states[2] < states[1]
        assert positive(rows[w, 2]["deepspeed_estimate_model_states_bytes"])
        assert positive(rows[w, 3]["deepspeed_estimate_model_states_bytes"])
    assert rows[8, 3]["model_states_bytes"] < rows[1, 3]["model_states_bytes"]
    assert "per GPU" in m["deepspeed_estimator_report"]


def test_summarize_run_leaves_out_each_stages_first_window():
    def rec(step, stage, rank, sps, wait=0.0):
        return {"step": step, "stage": stage, "rank": rank, "samples_per_sec": sps, "window_steps": 2,
                "step_seconds": 8 / sps, "data_wait_seconds": wait, "loss": 1.0, "rss_peak_bytes": 10 + rank}
    recs = []
    for rank in (0, 1):
        recs += [rec(2, 1, rank, 1.0, wait=5), rec(4, 1, rank, 100.0, wait=0.16), rec(6, 1, rank, 100.0),
                 rec(8, 2, rank, 2.0), rec(10, 2, rank, 50.0), rec(12, 2, rank, 50.0, wait=0.32)]
    s = bench.summarize_run(recs, batch=8)
    assert s["stage1"]["samples_per_sec"] == pytest.approx(100.0)
    assert s["stage2"]["samples_per_sec"] == pytest.approx(50.0)
    assert s["samples_per_sec"] == pytest.approx(2 / (1 / 100 + 1 / 50))
    # wait / step time over both ranks' steady windows: stage 1 0.32 s of 4 x 0.16 s
    assert s["stage1"]["data_wait_fraction"] == pytest.approx(0.32 / 0.64)
    assert [r["worker"] for r in s["rss_peak_bytes"]] == [10, 11]


@pytest.mark.slow
def test_tiny_bench_writes_the_contracted_json(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.run_bench(str(out), tiny=True, workdir=str(tmp_path / "work"))
    data = json.loads(out.read_text())
    assert data["mode"] == "tiny" and data == json.loads(json.dumps(res, default=float))
    for key in ("overhead_ratio", "data_ratio", "scaling_ratio", "flop_utilization", "parallel_efficiency"):
        assert positive(data[key]), (key, data[key])
    for key in ("ddp_ratio", "loader_ddp_ratio", "memory_ddp_ratio"):
        assert set(data[key]) == {"stage1", "stage2", "combined"} and all(positive(v) for v in data[key].values()), key
    raw = data["raw"]
    # each ratio is what its figures say it is
    for s in ("stage1", "stage2", "samples_per_sec"):
        t = raw["train_2x1"][s]["samples_per_sec"] if s != "samples_per_sec" else raw["train_2x1"][s]
        k = s if s != "samples_per_sec" else "combined"

        def sps(side):
            return raw[side][s]["samples_per_sec"] if s != "samples_per_sec" else raw[side][s]
        assert data["memory_ddp_ratio"][k] == pytest.approx(t / sps("ddp_2proc"))
        assert data["loader_ddp_ratio"][k] == pytest.approx(t / sps("loader_ddp_2proc"))
        assert data["ddp_ratio"][k] == data["memory_ddp_ratio"][k]
    assert data["parallel_efficiency"] == pytest.approx(
        raw["train_2x1"]["samples_per_sec"] / (2 * raw["plain_1thread"]["samples_per_sec"]))
    assert data["parallel_ceiling"] == pytest.approx(
        raw["independent_2proc"]["samples_per_sec"] / (2 * raw["plain_1thread"]["samples_per_sec"]))
    assert data["goals"]["loader_ddp_ratio"]["met"] == all(v >= 1.0 for v in data["loader_ddp_ratio"].values())
    assert data["goals"]["memory_ddp_ratio"]["met"] == all(v >= 0.85 for v in data["memory_ddp_ratio"].values())
    # the peers are real 2-process DDP runs of the same step on the same per-rank batch
    assert raw["ddp_2proc"]["stage1"]["backend"] == "gloo" == raw["loader_ddp_2proc"]["backend"]
    assert raw["ddp_2proc"]["stage1"]["micro_batch"] == raw["train_2x1"]["micro_batch"] == raw["loader_ddp_2proc"]["micro_batch"]
    for a, b in raw["loader_ddp_2proc"]["param_sums"]:
        assert a == b, "the loader peer's ranks diverged"
    for side in ("ddp_2proc", "deepspeed_2proc", "loader_ddp_2proc"):
        for s in ("stage1", "stage2"):
            assert all(math.isfinite(x) and x > 0 for x in raw[side][s]["losses"]), (side, s)
    # every trainer run trained: the exported student's stage-2 loss over the bench's batches
    # is below its initialisation's
    for run in ("train_1x1", "train_2x1", "train_1x2"):
        lo = raw[run]["batches_loss"]
        assert lo["final"] < 0.9 * lo["init"], (run, lo)
    assert all(positive(v) for v in data["bf16_autocast_speedup"].values())
    # the run's autocast, resolved on this CPU; every side trained at it
    assert data["autocast"]["asked"] == load_config("debug").autocast and data["autocast"]["used"] in ("off", "bf16")
    assert math.isfinite(data["data_wait_fraction"]) and 0 <= data["data_wait_fraction"] < 1
    assert set(data["goals"]) == set(bench.GOALS) >= {"loader_ddp_ratio", "memory_ddp_ratio"}
    assert not set(data["goals"]) & {"ddp_ratio", "parallel_efficiency"} and data["reference"] == list(bench.REFERENCE)
    for k in ("cpu_model", "cores", "memory_bytes"):
        assert data["machine"][k]
    for k in ("torch", "deepspeed", "ray", "python"):
        assert data["versions"][k]
    for run in ("plain_1thread", "train_1x1", "train_2x1", "train_1x2", "ddp_2proc", "deepspeed_2proc", "independent_2proc",
                "loader_ddp_2proc"):
        for stage in ("stage1", "stage2"):
            assert positive(raw[run][stage]["samples_per_sec"]), (run, stage)
    assert raw["train_2x1"]["workers"] == 2 and raw["train_1x2"]["threads_per_worker"] == 2
    assert positive(raw["pipeline"]["samples_per_sec"]) and positive(raw["matmul"]["flops_per_sec"])
    assert positive(raw["flops_per_step"]["stage1"]) and positive(raw["flops_per_step"]["stage2"])
    rss = data["memory"]["demo_rss_peak_bytes_per_worker"]
    assert len(rss) == 2 and all(positive(r["worker"]) and positive(r["reader"]) for r in rss)
    assert len(data["memory"]["paper_per_gpu"]) == 16


@pytest.mark.slow
def test_overlap_comm_keeps_fp32_weights_and_bf16_comm_does_not(batches):
    """deepspeed.overlap_comm (ZeRO 2) reaches DeepSpeed and claims the same fp32 sums, reordered
    in time: the 2-process engine ends with bit-identical weights with it on or off. The bf16
    all-reduce (deepspeed.comm_dtype) is the control: it rounds the gradients, the weights move."""
    from sdn_dist.training.loop import deepspeed_config

    def run(*overrides):
        c = load_config("debug", overrides=["teacher.weights=", "workers=2", "deepspeed.zero_stage=2", *overrides])
        zero = deepspeed_config(c, c.stage1)["zero_optimization"]
        r = bench.run_peer("deepspeed", c, batches, 1, steps=4, world=2, warmup=0, chunk=4)
        assert r["param_sha256"][0] == r["param_sha256"][1]
        return zero, r["param_sha256"][0]

    zero_off, off = run("deepspeed.overlap_comm=false")
    zero_on, on = run("deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=20000")
    assert (zero_off["overlap_comm"], zero_on["overlap_comm"], zero_on["reduce_bucket_size"]) == (False, True, 20000)
    assert on == off
    _, bf16 = run("deepspeed.comm_dtype=bf16")
    assert bf16 != off
