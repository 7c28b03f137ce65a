"""`sdn-dist generate` and `sdn-dist eval` on a real debug run (slow tier: it trains one).

One module-scoped debug run (~30 s) and one CLI eval of it (~10 s, trains the attribute evaluator
and caches it in the run) are shared by the tests below; the pure helpers are tested fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdn_dist.errors import UserError
from sdn_dist.evaluation.report import (fid_inception_v3, frechet_distance, inception_outputs,
                                        inception_score, load_inception, report_paths, run_dir_of)
from sdn_dist.evaluation.generate import file_names, slugify

SDN = [sys.executable, "-m", "sdn_dist"]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
N_TEST = 24


def cli(*args, timeout=300):
    return subprocess.run(SDN + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------------------------- fast tier

def test_slug_and_names():
    assert slugify("A big, RED circle!") == "a-big-red-circle"
    assert slugify("  ...  ") == "caption"
    assert slugify("x" * 100) == "x" * 60
    assert slugify("ab " * 40).endswith("ab") and len(slugify("ab " * 40)) <= 60
    assert file_names(["b", "a"]) == ["0000-b.png", "0001-a.png"]
    assert file_names(["c"] * 10001)[-1] == "10000-c.png"


def test_inception_score_math():
    k = 10
    uniform = torch.full((40, k), 1.0 / k)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    onehot = torch.eye(k).repeat(4, 1)           # 40 confident predictions, all classes equally
    mean, std, splits = inception_score(onehot, splits=1)
    assert mean == pytest.approx(k, rel=1e-6) and splits == 1
    assert inception_score(torch.eye(k).repeat(100, 1))[2] == 10   # 1000 images -> 10 splits
    assert inception_score(torch.eye(k).repeat(6, 1))[2] == 1      # 60 images -> 1 split


def test_frechet_distance_matches_pytorch_fid():
    """Our FID arithmetic (Gram-form nuclear norm / symmetric eigendecomposition) against
    pytorch-fid's reference (scipy sqrtm), with fewer and with more images than dimensions."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    g = torch.Generator().manual_seed(0)
    for n, m, d in [(10, 12, 64), (100, 90, 16)]:
        a = torch.randn(n, d, generator=g)
        b = torch.randn(m, d, generator=g) * 1.3 + 0.2
        A, B = a.double().numpy(), b.double().numpy()
        ref = calculate_frechet_distance(A.mean(0), np.cov(A, rowvar=False), B.mean(0), np.cov(B, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
        assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(3, 4))


def test_paths():
    assert report_paths("out/report.json") == {"report": "out/report.json", "summary": "out/report.txt",
                                               "grid": "out/report-grid.png"}
    assert run_dir_of("runs/a") == "runs/a"
    assert run_dir_of("runs/a/export/student.pt") == "runs/a"
    assert run_dir_of("runs/a/export") == run_dir_of("runs/a/export/model.safetensors") == "runs/a"
    assert run_dir_of("s3://b/x/model.pt") == "s3://b/x"


def _random_export(out: Path) -> Path:
    """A debug-preset student with random weights, exported as `sdn-dist train` does at the end
    (no training: the fast tier). -> the run directory."""
    from sdn_dist.config import load_config
    from sdn_dist.data.text import build_text_encoder
    from sdn_dist.model.student import Student
    from sdn_dist.training.export import export_student
    cfg = load_config("debug", overrides=[f"out={out}", "data.train=shards/synth/train-*.tar"])
    torch.manual_seed(0)
    export_student(cfg, Student(cfg.model, cfg.text.dim).state_dict(), build_text_encoder(cfg.text).record(), step=3)
    return out


def _png_bytes(colour, size=32) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def test_eval_counts_skipped_samples_by_reason(tmp_path):
    """Bad test samples are skipped, and report.json, report.txt and the printed summary say how
    many and why (the reason labels of sdn_data_samples_skipped_total)."""
    import webdataset as wds
    run = _random_export(tmp_path / "run")
    shard = tmp_path / "test-000000.tar"
    good = _png_bytes((200, 30, 30))
    with wds.TarWriter(str(shard)) as w:     # no labels: no evaluator to train
        w.write({"__key__": "a", "png": good, "txt": b"a red square"})
        w.write({"__key__": "b", "png": good[: len(good) // 2], "txt": b"a truncated image"})
        w.write({"__key__": "c", "png": good, "txt": b"  \n\n"})
        w.write({"__key__": "d", "png": b"not an image at all", "txt": b"a text file"})
        w.write({"__key__": "e", "png": good, "txt": b"another red square"})
        w.write({"__key__": "f", "png": good, "txt": b"\xff\xfe not UTF-8"})
    out = tmp_path / "report.json"
    r = cli("eval", "--checkpoint", run, "--shards", shard, "--out", out, "--grid", 0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    want = {"bad_caption": 1, "bad_image": 1, "empty_caption": 1, "not_image": 1}
    assert rep["n_images"] == 2 and rep["skipped"] == want and rep["n_skipped"] == 4
    line = "skipped 4 bad samples: bad_caption 1, bad_image 1, empty_caption 1, not_image 1"
    assert line in (tmp_path / "report.txt").read_text() and line in r.stdout


# ---------------------------------------------------------------------------------- slow tier

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sdn_dist.apps.synth.dataset import make_synth
    d = tmp_path_factory.mktemp("ge-shards")
    make_synth(out=str(d), train=160, test=N_TEST, size=32, per_shard=80, seed=3, progress=False)
    return d


def _first_images(urls, n, size=32):
    from sdn_dist.data.pipeline import iter_batches
    return next(iter_batches(urls, image_size=size, batch_size=n, shuffle=False, epochs=1, caption="first"))


@pytest.fixture(scope="module")
def fid_weights(shards, tmp_path_factory):
    """Inception weights made here, in pytorch-fid's file layout (pt_inception-2015-12-05-*.pth:
    the FID Inception blocks, a 1008-way fc): randomly initialised, then made usable on these
    images: batch-norm statistics and a centred, scaled classifier set from 8 training images
    (so that different images get confident, different predictions)."""
    path = tmp_path_factory.mktemp("fid-weights") / "pt_inception-test.pth"
    x = _first_images(f"{shards}/train-*.tar", 8)["image"]
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.manual_seed(0)
    net = fid_inception_v3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None            # cumulative average: running stats = this batch's
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(x)
        fc, net.fc = net.fc, torch.nn.Identity()
        f = net.eval()(x)
        fc.weight *= 5.0 / fc(f - f.mean(0)).std()
        fc.bias.copy_(-fc.weight @ f.mean(0))
        net.fc = fc
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ge-run") / "run"
    # model.text_norm on: generate and eval must apply the statistics the driver measured.
    r = cli("train", "--preset", "debug", "--quiet", "--set", f"out={out}",
            "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar",
            "--set", "model.text_norm=standardize", "--set", "data.caption=first", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the shareable folder, with the grid of the last step beside the card that shows it
    assert sorted(p.name for p in (out / "export").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                  "samples.png"]
    return out


def _student_pt(run, tmp_path) -> Path:
    """The exported student's weights as a real torch file (what a wrong file argument looks like)."""
    from safetensors.torch import load_file
    f = tmp_path / "student-weights.pt"
    torch.save(load_file(run / "export" / "model.safetensors"), f)
    return f


@pytest.fixture(scope="module")
def report(run, shards, tmp_path_factory):
    """One CLI eval of the whole test split (trains + caches the evaluator in the run)."""
    out = tmp_path_factory.mktemp("ge-eval") / "report.json"
    r = cli("eval", "--checkpoint", run, "--shards", f"{shards}/test-*.tar", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_text_norm_statistics_reach_the_exported_student(run, shards):
    """The driver measures the training captions' embeddings (model.text_norm=standardize) and
    the exported student carries them: mean and 1/std of all 160 training captions here."""
    from sdn_dist.data.pipeline import iter_batches
    from sdn_dist.data.text import build_text_encoder
    from sdn_dist.config import load_config
    enc = build_text_encoder(load_config("debug").text)
    text = torch.cat([b["text"] for b in iter_batches(f"{shards}/train-*.tar", image_size=32, batch_size=64,
                                                      text_encoder=enc, shuffle=False, epochs=1, caption="first")]).double()
    assert len(text) == 160
    from safetensors.torch import load_file
    sd = load_file(run / "export" / "model.safetensors")
    assert torch.allclose(sd["text_shift"].double(), text.mean(0), atol=1e-6)
    assert float(sd["text_scale"]) == pytest.approx(1.0 / float((text - text.mean(0)).pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.slow
def test_generate_names_order_and_pngs(run, tmp_path):
    from sdn_dist.evaluation.generate import generate
    caps = ["a large red circle in the top left on a white background", "Small BLUE square?!",
            "x" * 100, "a green cross", "a purple triangle in the bottom right"]
    out = tmp_path / "gen" / "nested"                     # created
    paths = generate(str(run), caps, str(out), batch_size=2)
    names = [Path(p).name for p in paths]
    assert names == ["0000-a-large-red-circle-in-the-top-left-on-a-white-background.png",
                     "0001-small-blue-square.png", f"0002-{'x' * 60}.png", "0003-a-green-cross.png",
                     "0004-a-purple-triangle-in-the-bottom-right.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
    # Same caption -> same image, whatever the batch it is in (deterministic).
    again = generate(str(run), caps[:1], str(tmp_path / "again"), batch_size=1)
    assert Path(again[0]).read_bytes() == Path(paths[0]).read_bytes()


@pytest.mark.slow
def test_pipeline_from_pretrained_gives_generates_images(run, tmp_path):
    """The acceptance check on a really trained run: Pipeline.from_pretrained(export) and
    `sdn-dist generate` give the same pixels for the same captions and seed."""
    from sdn_dist import Pipeline
    caps = ["a large red circle in the top left on a white background", "a small blue square", "a green cross"]
    images = Pipeline.from_pretrained(str(run / "export"), device="cpu")(caps, seed=5, batch_size=2)
    r = cli("generate", "--checkpoint", run / "export", "--out", tmp_path / "g", "--seed", 5,
            *[a for c in caps for a in ("--text", c)])
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted((tmp_path / "g").iterdir())
    assert len(pngs) == 3
    for im, png in zip(images, pngs):
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(png).convert("RGB"))), png.name


@pytest.mark.slow
def test_model_card_gets_the_eval_figures(report, run):
    out, rep = report
    card = (run / "export" / "README.md").read_text()
    assert "![samples](samples.png)" in card and "| optimizer steps |" in card
    assert "Not evaluated yet" not in card
    assert f"| ssim | {rep['ssim']:.4g} |" in card and f"| fsim | {rep['fsim']:.4g} |" in card
    assert f"{rep['n_images']} images" in card


@pytest.mark.slow
def test_generate_cli_from_exported_file_url(run, tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("a yellow square\n  a blue disc  \n")    # stripped; a blank line would be exit 2
    ckpt = f"file://{run}/export"
    r = cli("generate", "--checkpoint", ckpt, "--text", "first one", "--text-file", f,
            "--out", tmp_path / "g", "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "0000-first-one.png", "0001-a-yellow-square.png", "0002-a-blue-disc.png"]


@pytest.mark.slow
def test_generate_refuses_precomputed_encoder(run, tmp_path):
    from sdn_dist.evaluation.generate import generate
    import shutil
    ckpt = tmp_path / "pre"
    shutil.copytree(run / "export", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text"] = {"encoder": "precomputed", "dim": config["text"]["dim"]}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="precomputed"):
        generate(str(ckpt), ["a red circle"], str(tmp_path / "g"))
    r = cli("generate", "--checkpoint", ckpt, "--text", "a red circle", "--out", tmp_path / "g")
    assert r.returncode == 2 and "precomputed" in r.stderr and "free text" in r.stderr


@pytest.mark.slow
def test_missing_checkpoint_exits_2(shards, tmp_path):
    missing = tmp_path / "no-such-run"
    r = cli("generate", "--checkpoint", missing, "--text", "a", "--out", tmp_path / "g")
    assert r.returncode == 2 and str(missing) in r.stderr and r.stderr.startswith("error:")
    r = cli("eval", "--checkpoint", missing, "--shards", f"{shards}/test-*.tar", "--out", tmp_path / "r.json")
    assert r.returncode == 2 and str(missing) in r.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_eval_report_fields_and_ranges(report, run):
    out, rep = report
    assert rep["n_images"] == N_TEST
    assert 0 <= rep["ssim"] <= 1 and 0 <= rep["fsim"] <= 1
    attrs = {"shape", "colour", "size", "position", "background"}
    assert set(rep["attribute_accuracy"]) == attrs == set(rep["attribute_accuracy_real"]) == set(rep["chance"])
    for d in (rep["attribute_accuracy"], rep["attribute_accuracy_real"], rep["chance"]):
        assert all(0 <= v <= 1 for v in d.values())
    assert rep["chance"]["colour"] == pytest.approx(1 / 6, abs=1e-3)
    assert set(rep["by_split"]) == {"seen", "heldout", "paraphrase"}
    assert sum(v["n_images"] for v in rep["by_split"].values()) == N_TEST
    for v in rep["by_split"].values():
        assert 0 <= v["ssim"] <= 1 and 0 <= v["fsim"] <= 1
        assert set(v["attribute_accuracy"]) == attrs
        assert all(0 <= x <= 1 for x in {**v["attribute_accuracy"], **v["attribute_accuracy_real"]}.values())
    # The confusion table: caption's value -> what the evaluator sees in the generated image. Its
    # rows hold every scored image and its diagonal is the generated images' accuracy.
    for v in [rep, *rep["by_split"].values()]:
        for a, rows in v["attribute_confusion"].items():
            assert sum(sum(r.values()) for r in rows.values()) == v["attribute_n"][a]
            right = sum(r.get(t, 0) for t, r in rows.items())
            assert right / v["attribute_n"][a] == pytest.approx(v["attribute_accuracy"][a], abs=1e-4)
    assert set(rep["attribute_confusion"]) == attrs
    assert "inception_score" not in rep                          # only with user-supplied weights
    summary = Path(rep["summary"]).read_text()
    assert summary.count("SSIM") >= 1
    # report.txt names the commonest mistake of each attribute the generated images get wrong
    # (the fixture's short run gets some wrong).
    assert any(v < 1 for v in rep["attribute_accuracy"].values())
    for a, rows in rep["attribute_confusion"].items():
        off = [(c, t, p) for t, r in rows.items() for p, c in r.items() if p != t]
        if off:
            c, t, p = max(off)
            assert f"{t} -> {p} {c}" in summary, (a, summary)
    with Image.open(rep["grid"]) as im:
        assert im.format == "PNG" and im.size[0] > 8 * 32 and im.size[1] > 2 * 32
    assert rep["evaluator"]["path"] == str(run / "evaluator.pt") and (run / "evaluator.pt").exists()


@pytest.mark.slow
def test_evaluator_is_not_the_teacher_and_beats_chance(report, run, shards, tmp_path):
    from torchvision.models.resnet import BasicBlock

    from sdn_dist.evaluation.judge import SmallResNet, load_evaluator
    from sdn_dist.model.teacher import Teacher
    _, rep = report
    ev = load_evaluator(str(run / "evaluator.pt"))
    assert isinstance(ev.model, SmallResNet) and not isinstance(ev.model, Teacher)
    assert any(isinstance(m, BasicBlock) for m in ev.model.modules())        # residual, not VGG
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in ev.model.modules())
    assert ev.meta["train"] == f"{shards}/train-*.tar"             # real training images only
    # Its accuracy on the REAL test images is well above chance (the ceiling beside the
    # generated images' accuracy); colour and background are easy even with 160 images.
    real, chance = rep["attribute_accuracy_real"], rep["chance"]
    assert rep["attribute_accuracy_real_mean"] > sum(chance.values()) / len(chance) + 0.2
    for a in ("colour", "background"):
        assert real[a] >= chance[a] + 0.3, (a, real[a])
    # The evaluator file is not a student or teacher file, and those are not evaluators.
    with pytest.raises(UserError, match="not an sdn-dist evaluator"):
        load_evaluator(str(_student_pt(run, tmp_path)))


@pytest.mark.slow
def test_fid_and_inception_score_with_user_weights(fid_weights, shards, tmp_path):
    from torchvision.models import inception_v3
    model = load_inception(str(fid_weights))
    assert model.variant == "pytorch-fid"
    real = _first_images(f"{shards}/test-*.tar", 12)["image"]
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f_real, p_real = inception_outputs(model, real)
    f_noise, _ = inception_outputs(model, noise)
    assert f_real.shape == (12, 2048) and p_real.shape == (12, 1008)
    # FID: a set against itself ~0; against another half of the same data small; against a
    # different distribution (uniform noise) far larger.
    same, halves, other = (frechet_distance(f_real, f_real.clone()), frechet_distance(f_real[:6], f_real[6:]),
                           frechet_distance(f_real, f_noise))
    assert same < 1e-6 * other and halves * 20 < other, (same, halves, other)
    # IS: identical images -> 1; different images under this classifier -> clearly more.
    _, p_same = inception_outputs(model, real[:1].expand(8, -1, -1, -1))
    assert inception_score(p_same)[0] == pytest.approx(1.0, abs=1e-6)
    assert inception_score(p_real)[0] > 2.0
    # torchvision's own Inception-v3 layout still loads (the IS-only format of before).
    tv = tmp_path / "tv.pt"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tv)
    m_tv = load_inception(str(tv))
    f, p = inception_outputs(m_tv, real[:2])
    assert m_tv.variant == "torchvision" and f.shape == (2, 2048) and p.shape == (2, 1000)


@pytest.mark.slow
def test_eval_limit_fid_and_inception_weights(report, run, shards, fid_weights, tmp_path):
    from sdn_dist.evaluation.generate import generate
    from sdn_dist.evaluation.report import evaluate
    out = tmp_path / "sub" / "limited.json"
    rep = evaluate(str(run), f"{shards}/test-*.tar", str(out), limit=5,
                   evaluator=str(run / "evaluator.pt"), inception_weights=str(fid_weights), progress=False)
    assert rep["n_images"] == 5 == json.loads(out.read_text())["n_images"]
    assert rep["inception_splits"] == 1 and rep["inception_variant"] == "pytorch-fid"
    # FID is of the generated images against the paired real ones, IS of the generated images:
    # recompute both from `generate`'s PNGs of the same 5 first captions (8-bit rounding apart).
    first = _first_images(f"{shards}/test-*.tar", 5)
    pngs = generate(str(run), first["captions"], str(tmp_path / "gen"))
    gen = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                       for p in pngs]).float() / 255
    model = load_inception(str(fid_weights))
    f_gen, p_gen = inception_outputs(model, gen)
    f_real, _ = inception_outputs(model, first["image"])
    assert rep["fid"] == pytest.approx(frechet_distance(f_gen, f_real), rel=0.05)
    assert rep["fid"] > 10 * frechet_distance(f_real, f_real.clone()) + 1.0
    assert rep["inception_score"] == pytest.approx(inception_score(p_gen)[0], rel=0.05)
    assert "FID" in (tmp_path / "sub" / "limited.txt").read_text()
    assert (tmp_path / "sub" / "limited-grid.png").exists()
    assert 0 <= rep["ssim"] <= 1 and not rep["evaluator"]["trained_now"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=str(bad)):
        evaluate(str(run), f"{shards}/test-*.tar", str(tmp_path / "x.json"), limit=2,
                 evaluator=str(run / "evaluator.pt"), inception_weights=str(bad), progress=False)
    # A real torch file that is not Inception (the student): named, nothing written.
    wrong = _student_pt(run, tmp_path)
    with pytest.raises(UserError, match=f"{wrong}.*not an Inception-v3"):
        evaluate(str(run), f"{shards}/test-*.tar", str(tmp_path / "y.json"), limit=2,
                 evaluator=str(run / "evaluator.pt"), inception_weights=str(wrong), progress=False)
    assert not (tmp_path / "y.json").exists()


class _Hostile:
    """Unpickling this runs a shell command: what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_eval_hostile_inception_weights_exit_2(run, shards, tmp_path):
    hostile = tmp_path / "pt_inception-evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": _Hostile(marker)}, hostile)
    r = cli("eval", "--checkpoint", run, "--shards", f"{shards}/test-*.tar", "--out", tmp_path / "r.json",
            "--limit", 2, "--evaluator", run / "evaluator.pt", "--inception-weights", hostile)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error:") and str(hostile) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "r.json").exists()
