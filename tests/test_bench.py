"""The benchmark (`sdn-dist bench`): its measurements on the debug preset, and the JSON of a tiny run.

    pytest tests/test_bench.py -m "not slow"     # the measurement functions, seconds
    pytest tests/test_bench.py                   # + a whole tiny run (real Ray, DeepSpeed), ~2 min
"""

import json
import math

import pytest
import torch

from sdn_dist.commands import bench
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


def test_plain_loop_trains(cfg):
    torch.manual_seed(0)
    s = cfg.model.image_size
    batches = [(torch.rand(4, 3, s, s), torch.randn(4, cfg.text.dim)) for _ in range(2)]
    for stage in (1, 2):
        r = bench.plain_loop(cfg, batches, stage, steps=3, n_threads=1, warmup=1)
        assert positive(r["samples_per_sec"]) and positive(r["loss"]) and r["batch"] == 4


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
    for key in ("overhead_ratio", "data_ratio", "scaling_ratio", "flop_utilization"):
        assert positive(data[key]), (key, data[key])
    assert math.isfinite(data["data_wait_fraction"]) and 0 <= data["data_wait_fraction"] < 1
    assert set(data["goals"]) == set(bench.GOALS)
    for k in ("cpu_model", "cores", "memory_bytes"):
        assert data["machine"][k]
    for k in ("torch", "deepspeed", "ray", "python"):
        assert data["versions"][k]
    raw = data["raw"]
    for run in ("plain_1thread", "train_1x1", "train_2x1", "train_1x2"):
        for stage in ("stage1", "stage2"):
            assert positive(raw[run][stage]["samples_per_sec"]), (run, stage)
    assert raw["train_2x1"]["workers"] == 2 and raw["train_1x2"]["threads_per_worker"] == 2
    assert positive(raw["pipeline"]["samples_per_sec"]) and positive(raw["matmul"]["flops_per_sec"])
    assert positive(raw["flops_per_step"]["stage1"]) and positive(raw["flops_per_step"]["stage2"])
    rss = data["memory"]["demo_rss_peak_bytes_per_worker"]
    assert len(rss) == 2 and all(positive(r["worker"]) and positive(r["reader"]) for r in rss)
    assert len(data["memory"]["paper_per_gpu"]) == 16
