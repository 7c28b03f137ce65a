"""The README's "Train on your own images" lines, run as written on a tiny folder of each kind
(slow tier: real Ray, DeepSpeed, the CLI as a user types it).

    pytest tests/test_readme_own_data.py

The one change to the lines: `--preset demo` becomes `--preset debug` (toy sizes, seconds instead
of the demo's 15 minutes). Everything else, paths included, is the README's text, so the README
cannot drift from what works.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from owndata import img2dataset_folder, labelled_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_block(name: str) -> list[str]:
    """The commands of the ```bash block after `<!-- own-data: NAME -->`, continuations joined."""
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- own-data: {name} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no own-data block {name!r}"
    return [l for l in re.sub(r"\\\n\s*", "", m.group(1)).splitlines() if l.strip()]


def run_readme(name: str, cwd: Path) -> dict[str, str]:
    """Runs the block's lines in ``cwd``; {line: its stderr}."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    lines = readme_block(name)
    assert any("--preset demo" in l for l in lines)
    said = {}
    for line in lines:
        assert line.startswith("sdn-dist "), line
        line = line.replace("--preset demo", "--preset debug")
        r = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
        said[line] = r.stderr
    return said


def teacher_objective(path: Path) -> str:
    import torch
    return torch.load(path, weights_only=True)["meta"]["objective"]


def _check_run(cwd: Path, run: str, labelled: bool) -> dict:
    gen = sorted((cwd / "runs" / run / "generated").glob("*.png"))
    assert len(gen) == 1 and gen[0].name.startswith("0000-a-red-ball"), gen
    report = json.loads((cwd / "runs" / run / "report.json").read_text())
    assert report["n_images"] > 0 and 0 < report["ssim"] <= 1 and report["fsim"] > 0, report
    assert bool(report.get("attribute_accuracy")) == labelled, report
    assert list((cwd / "runs" / run / "samples").glob("step-*.png"))
    return report


def test_readme_own_data_from_a_labelled_folder(tmp_path):
    labelled_folder(tmp_path, n=40).rename(tmp_path / "my-photos")
    said = run_readme("folder", tmp_path)
    assert teacher_objective(tmp_path / "runs" / "mine-teacher.pt") == "labels"
    report = _check_run(tmp_path, "mine", labelled=True)
    assert "label" in report["attribute_accuracy"]
    # the directory gave training its train-* shards only, and eval its test-* shards
    train = next(err for line, err in said.items() if line.startswith("sdn-dist train "))
    assert "train-* shards (of 2 tars) used as train data" in train, train[-2000:]
    evaluate = next(err for line, err in said.items() if line.startswith("sdn-dist eval "))
    assert "test-* shards (of 2 tars) used as test data" in evaluate, evaluate[-2000:]


def test_readme_own_data_from_img2dataset_output(tmp_path):
    img2dataset_folder(tmp_path)
    run_readme("img2dataset", tmp_path)
    assert teacher_objective(tmp_path / "runs" / "web-teacher.pt") == "caption"
    report = _check_run(tmp_path, "web", labelled=False)
    assert any("carry no labels" in n for n in report.get("notes", [])), report
