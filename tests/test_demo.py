"""`sdn-dist demo` end to end at debug size (slow tier: real Ray, real DeepSpeed, ~1-2 minutes).

shards -> teacher -> stage 1 -> stage 2 -> eval -> grid, then a second run that must reuse every
part and finish quickly.
"""

import json
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

SDN = [sys.executable, "-m", "sdn_dist"]


def demo(out, timeout=600):
    t = time.time()
    # The teacher as the demo preset trains it: two data-parallel processes (teacher.train.processes).
    r = subprocess.run(SDN + ["demo", "--preset", "debug", "--out", str(out), "--set", "teacher.train.processes=2"],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, time.time() - t


def test_demo_debug_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    stdout, first = demo(out)

    # Every part's output is there.
    assert (out / "shards" / "synth.json").exists()
    assert sorted(p.name for p in (out / "shards").glob("train-*.tar"))
    assert sorted(p.name for p in (out / "shards").glob("test-*.tar"))
    teacher = torch.load(out / "teacher.pt", weights_only=True)
    assert teacher["format"] == "sdn-dist-teacher/1"
    assert teacher["meta"]["rescaled"]["images"] > 0 and teacher["meta"]["processes"] == 2
    run = out / "run"
    assert (run / "config.yaml").exists() and (run / "export" / "model.safetensors").exists()
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert max(steps) == 16                                  # debug: 8 + 8 steps
    assert list((run / "samples").glob("*.png"))
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The report is sane: both split kinds, accuracies in [0, 1], real-image ceiling beside them.
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_images"] == 32
    for key in ("ssim", "fsim"):
        assert 0.0 <= rep[key] <= 1.0
    attrs = {"shape", "colour", "size", "position", "background"}
    assert set(rep["attribute_accuracy"]) == attrs == set(rep["attribute_accuracy_real"])
    assert all(0.0 <= v <= 1.0 for v in rep["attribute_accuracy"].values())
    assert set(rep["by_split"]) == {"seen", "heldout", "paraphrase"}
    for kind, n in (("heldout", 16), ("seen", 8), ("paraphrase", 8)):
        v = rep["by_split"][kind]
        assert v["n_images"] == n
        assert 0.0 <= v["attribute_accuracy_mean"] <= 1.0 and 0.0 < v["attribute_accuracy_real_mean"] <= 1.0
    info = json.loads((out / "demo.json").read_text())
    assert info["reused"] == [] and set(info["seconds"]) >= {"shards", "teacher", "train", "eval", "total"}
    for part in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "demo finished"):
        assert part in stdout

    # Second run: everything reused, nothing retrained, quick.
    before = {p: p.stat().st_mtime_ns for p in (out / "teacher.pt", run / "export" / "model.safetensors", out / "report.json")}
    stdout2, second = demo(out)
    assert stdout2.count("reusing") == 4, stdout2
    assert json.loads((out / "demo.json").read_text())["reused"] == ["shards", "teacher", "train", "eval"]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert second < max(30.0, first / 2), (first, second)
