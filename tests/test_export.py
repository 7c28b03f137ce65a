"""The export folder (model.safetensors + config.json + README.md), the Python pipeline, and the
README's example, on a small student exported here (no training: the fast tier).

    .venv/bin/python -m pytest tests/test_export.py -q

The same checks on a really trained run (the debug preset) are in tests/test_generate_eval.py.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdn_dist.config import load_config
from sdn_dist.data.text import build_text_encoder
from sdn_dist.errors import UserError
from sdn_dist.model.student import Student

REPO = Path(__file__).resolve().parents[1]
SDN = [sys.executable, "-m", "sdn_dist"]
CAPTIONS = ["a large red circle in the top left on a white background", "a small blue square",
            "a green cross", "a purple triangle in the bottom right", "a yellow disc"]


def cli(*args, timeout=120, cwd=None):
    return subprocess.run(SDN + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def export_run(out: Path, *overrides: str) -> Path:
    """A debug-preset student with noise input and text standardisation (both must travel in the
    export), random weights, exported as `sdn-dist train` does at the end. -> the export folder."""
    from sdn_dist.training.export import export_student
    cfg = load_config("debug", overrides=["model.noise_dim=4", "model.text_norm=standardize",
                                          f"out={out}", "data.train=shards/synth/train-*.tar", *overrides])
    enc = build_text_encoder(cfg.text)
    torch.manual_seed(0)
    student = Student(cfg.model, cfg.text.dim)
    student.set_text_statistics({"mean": [0.01 * i for i in range(cfg.text.dim)], "std": 0.5})
    with torch.no_grad():
        student.convs["image"].bias.fill_(0.5)        # mid-grey plus structure: not all clamped to 0
    return Path(export_student(cfg, student.state_dict(), enc.record(), step=7))


@pytest.fixture
def export(tmp_path):
    return export_run(tmp_path / "runs" / "demo")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def test_export_folder_holds_weights_config_and_card_and_no_pickle(export):
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((export / "config.json").read_text())
    assert config["format"] == "sdn-dist-export/1" and config["image_size"] == 32 and config["step"] == 7
    assert config["text"] == {"encoder": "hash", "dim": 32, "version": 1}
    assert config["model"]["noise_dim"] == 4 and config["model"]["text_norm"] == "standardize"
    assert config["text_statistics"]["std"] == pytest.approx(0.5)
    assert config["text_statistics"]["mean"][3] == pytest.approx(0.03)
    card = (export / "README.md").read_text()
    assert "shards/synth/train-*.tar" in card and "| optimizer steps | 7 |" in card and "`debug`" in card
    assert "Not evaluated yet" in card and "samples.png" not in card      # this run wrote no grid


def test_export_loads_with_safetensors_and_json_alone(export):
    """A consumer needs safetensors, json and the model's class: no sdn-dist loader, no pickle
    (torch.load and sdn_dist.training.export are made unusable in that process)."""
    script = f"""
import json, sys
sys.modules["sdn_dist.training.export"] = None      # importing sdn-dist's loader now fails
import torch
torch.load = None                                    # so does unpickling through torch
from safetensors.torch import load_file
from sdn_dist.config import ModelConfig
from sdn_dist.model.student import Student
config = json.load(open("{export}/config.json"))
weights = load_file("{export}/model.safetensors")
student = Student(ModelConfig(**config["model"]), config["text"]["dim"])
student.load_state_dict(weights, strict=True)
mean = torch.tensor(config["text_statistics"]["mean"])
assert torch.equal(student.text_shift, mean.float()), "text statistics differ"
image = student.eval()(torch.zeros(1, config["text"]["dim"]), torch.zeros(1, config["model"]["noise_dim"]))["image"]
assert image.shape == (1, 3, config["image_size"], config["image_size"]), image.shape
print("ok", len(weights))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_pipeline_is_batched_seeded_and_equals_generate(export, tmp_path):
    from sdn_dist import Pipeline
    from sdn_dist.evaluation.generate import generate
    pipe = Pipeline.from_pretrained(str(export), device="cpu")
    images = pipe(CAPTIONS, seed=3, batch_size=2)
    assert len(images) == 5 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    assert pixels(images).std() > 0                                       # not a blank image
    assert np.array_equal(pixels(images), pixels(pipe(CAPTIONS, seed=3, batch_size=2)))
    assert not np.array_equal(pixels(images), pixels(pipe(CAPTIONS, seed=4, batch_size=2)))  # noise_dim 4
    assert np.array_equal(pixels(images), pixels(pipe(CAPTIONS, seed=3, batch_size=5)))   # any batch size
    paths = generate(str(export), CAPTIONS, str(tmp_path / "gen"), batch_size=2, seed=3)
    assert np.array_equal(pixels(images), pixels(Image.open(p) for p in paths))
    # the run directory, a file in the folder, and file:// name the same export
    for other in (export.parent, export / "model.safetensors", f"file://{export}"):
        assert np.array_equal(pixels(images), pixels(Pipeline.from_pretrained(str(other), device="cpu")(
            CAPTIONS, seed=3, batch_size=2)))


def test_pipeline_reads_the_export_from_s3(export, s3):
    from sdn_dist import Pipeline
    s3.fs.put(str(export), s3.url("runs", "demo", "export"), recursive=True)
    local = Pipeline.from_pretrained(str(export), device="cpu")(CAPTIONS, seed=1, batch_size=1)
    remote = Pipeline.from_pretrained(s3.url("runs", "demo"), device="cpu")(CAPTIONS, seed=1)
    assert np.array_equal(pixels(local), pixels(remote))
    r = cli("generate", "--checkpoint", s3.url("runs", "demo", "export"), "--text", CAPTIONS[0],
            "--seed", 1, "--out", s3.url("gen"))
    assert r.returncode == 0, r.stderr[-2000:]
    with s3.fs.open(s3.url("gen", "0000-a-large-red-circle-in-the-top-left-on-a-white-background.png"), "rb") as f:
        assert np.array_equal(pixels([Image.open(f)]), pixels(local[:1]))


def test_readme_example_runs(export, tmp_path):
    """The README's "Use the trained model" snippet, run as written from a directory where
    runs/demo is a finished run (so the README cannot drift from the API)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use the trained model", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", snippet], cwd=export.parent.parent.parent, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.name for p in export.parent.parent.parent.glob("*.png"))
    assert written, f"the README snippet saved no image: {r.stdout}"
    for name in written:
        with Image.open(export.parent.parent.parent / name) as im:
            assert im.size == (32, 32)


# ---------------------------------------------------------------------------------- bad input

def test_missing_config_json_is_exit_2_naming_it(export, tmp_path):
    (export / "config.json").unlink()
    r = cli("generate", "--checkpoint", export, "--text", "a", "--out", tmp_path / "g")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert f"{export}/config.json" in r.stderr and "missing" in r.stderr


def test_wrong_tensors_are_exit_2_naming_the_tensor(export, tmp_path):
    from safetensors.torch import load_file, save_file
    w = load_file(export / "model.safetensors")
    w["fc7.weight"] = torch.zeros(3, 3)
    save_file(w, export / "model.safetensors")
    r = cli("generate", "--checkpoint", export, "--text", "a", "--out", tmp_path / "g")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.safetensors" in r.stderr and "'fc7.weight'" in r.stderr and "[3, 3]" in r.stderr
    del w["fc7.weight"]
    save_file(w, export / "model.safetensors")
    with pytest.raises(UserError, match="tensor 'fc7.weight' is missing"):
        from sdn_dist.training.export import load_student
        load_student(str(export))
    (export / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        load_student(str(export))


def test_bad_config_json_names_the_key(export):
    from sdn_dist.training.export import load_student
    config = json.loads((export / "config.json").read_text())
    del config["text"]
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json: key 'text' is missing"):
        load_student(str(export))
    config["text"] = {"encoder": "hash", "dim": 32, "version": 1}
    config["model"]["width"] = 5
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json: key 'model.width': Input should be less than or equal to 1"):
        load_student(str(export))
    (export / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not valid JSON"):
        load_student(str(export))


# ---------------------------------------------------------------------------------- older runs

def test_older_student_pt_is_still_read_and_converts(export, tmp_path, caplog):
    """Runs exported before the folder have export/student.pt (read until 1.0): same images, a
    warning, and `python -m sdn_dist.training.export RUN` turns it into the folder."""
    from safetensors.torch import load_file

    from sdn_dist import Pipeline
    config = json.loads((export / "config.json").read_text())
    old = tmp_path / "old" / "export"
    old.mkdir(parents=True)
    torch.save({"format": "sdn-dist-student/1", "state_dict": load_file(export / "model.safetensors"),
                "model": config["model"], "text": config["text"], "step": 7, "preset": "debug",
                "teacher": "", "data": config["data"]}, old / "student.pt")
    want = pixels(Pipeline.from_pretrained(str(export), device="cpu")(CAPTIONS, seed=2))
    # On the export module's logger itself: whether the warning reaches stderr (the CLI's handler on
    # the package logger) or the root logger depends on whether an in-process `sdn-dist` command ran
    # before this test in the same process (under pytest-xdist, which tests a worker ran before).
    logger = logging.getLogger("sdn_dist.training.export")
    logger.addHandler(caplog.handler)
    try:
        assert np.array_equal(pixels(Pipeline.from_pretrained(str(old.parent), device="cpu")(CAPTIONS, seed=2)), want)
    finally:
        logger.removeHandler(caplog.handler)
    assert "read until sdn-dist 1.0" in caplog.text
    r = subprocess.run([sys.executable, "-m", "sdn_dist.training.export", str(old.parent)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (old / "config.json").exists() and (old / "model.safetensors").exists()
    (old / "student.pt").unlink()                     # the folder alone now
    assert np.array_equal(pixels(Pipeline.from_pretrained(str(old.parent), device="cpu")(CAPTIONS, seed=2)), want)
