"""A user's own data (fast tier): presets that name no benchmark label, the synth recipe, a teacher
from labels or from captions alone, a random teacher only by name, the teacher over https, train
and test kept apart, converters that cannot read outside --images.

    pytest tests/test_own_data.py
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from owndata import img2dataset_folder, labelled_folder
from sdn_dist.config import PRESETS, load_config
from sdn_dist.errors import ConfigError, DataError

SDN = [sys.executable, "-m", "sdn_dist.cli"]


def cli(*args, timeout=300, **kw):
    return subprocess.run(SDN + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def error_line(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ---------------------------------------------------------------- presets and the synth recipe

@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_name_no_label_of_the_benchmark(preset):
    """Every preset trains on any shards: no label names, no per-label heads. (Catches the
    benchmark's `labels` or `level_heads` put back into a preset.)"""
    t = load_config(preset).teacher.train
    assert t.labels == [] and t.level_heads == {} and t.objective == "auto", (preset, t)


def test_synth_recipe_is_the_benchmarks_tuning_on_the_demo_preset():
    """The recipe carries the benchmark's values and names its preset; an explicit preset and
    --set still win. (Catches a recipe layer dropped or applied after the overrides.)"""
    cfg = load_config(recipe="synth")
    assert cfg.preset == "demo" and cfg.recipe == "synth"
    assert cfg.teacher.train.labels == ["shape", "colour", "size", "position", "background"]
    assert cfg.teacher.train.level_heads == {"colour": 1.0}
    assert (cfg.model.output, cfg.model.negative_slope) == ("sigmoid", 0.1)
    assert cfg.stage2.point_weights == {"image": 60.0} and cfg.stage1.tv_weight == 10.0
    assert cfg.stage1.steps == PRESETS["demo"]["stage1"]["steps"]          # the preset's budget
    over = load_config("debug", recipe="synth", overrides=["model.output=linear"])
    assert over.preset == "debug" and over.model.output == "linear" and over.model.image_size == 32


def test_recipe_on_the_command_line(tmp_path):
    r = cli("config", "show", "--recipe", "synth")
    assert r.returncode == 0, r.stderr
    assert "- colour" in r.stdout and "recipe: synth" in r.stdout and "preset: demo" in r.stdout
    error_line(cli("config", "show", "--recipe", "nosuch"), "unknown recipe 'nosuch'", "synth")
    error_line(cli("config", "show", "--recipe", str(tmp_path / "none.yaml")), "recipe", "does not exist")


def test_explicit_preset_beats_the_files_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: debug\nstage1: {steps: 3}\n")
    cfg = load_config("demo", file=f)
    assert cfg.preset == "demo" and cfg.stage1.steps == 3 and cfg.model.image_size == 64


# ---------------------------------------------------------------- the teacher: chosen, never silent

@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_empty_teacher_weights_outside_debug_exit_2_naming_the_key(tmp_path, preset):
    """(Catches the check removed, or limited to one preset.)"""
    r = cli("train", "--preset", preset, "--set", f"out={tmp_path / 'run'}",
            "--set", f"data.train={tmp_path / 'nothing'}")
    line = error_line(r, "teacher.weights is empty", "sdn-dist teacher train", "teacher.weights=random")
    assert "vgg19" in line.lower()
    assert not (tmp_path / "run").exists()   # nothing written


def test_random_teacher_by_name_and_empty_only_in_debug():
    from sdn_dist.model.teacher import build_teacher
    from sdn_dist.training import preflight
    from sdn_dist.training.driver import resolve_config
    cfg = load_config("debug", overrides=["teacher.weights=random"])
    assert resolve_config(cfg).teacher.weights == "random"        # not made a local path
    t = build_teacher(cfg.model, cfg.teacher)
    assert t.frozen
    preflight.check_config(load_config("debug"))                  # debug: empty is random
    with pytest.raises(ConfigError, match="teacher.weights is empty"):
        preflight.check_config(load_config("demo"))
    preflight.check_config(load_config("demo", overrides=["teacher.weights=random"]))


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_torchvision_format_teacher_over_https(tmp_path):
    """teacher.weights=https://...: a plain torchvision-format VGG19 state dict (features.N keys)
    served by a local HTTPS server, read through fsspec and loaded into the teacher."""
    from sdn_dist.model.teacher import Teacher
    src = Teacher(load_config("debug").model)
    torch.manual_seed(3)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    (tmp_path / "www").mkdir()
    torch.save({k: v for k, v in src.state_dict().items() if k.startswith("features.")},
               tmp_path / "www" / "vgg19.pth")
    cert, key = _self_signed(tmp_path)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # A process of its own that trusts the test's certificate from its start, as a user's would
    # trust their CAs (aiohttp builds its TLS context once, when it is first imported).
    env = dict(os.environ, SSL_CERT_FILE=str(cert))
    check = ("import sys, torch; from sdn_dist.config import load_config; "
             "from sdn_dist.model.teacher import build_teacher; cfg = load_config('debug'); "
             "t = build_teacher(cfg.model, cfg.teacher.model_copy(update={'weights': sys.argv[1]})); "
             "want = torch.load(sys.argv[2], weights_only=True)['features.0.weight']; "
             "print('same' if torch.equal(t.features[0].weight, want) else 'differ')")
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/vgg19.pth"
        r = subprocess.run([sys.executable, "-c", check, url, str(tmp_path / "www" / "vgg19.pth")],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.stdout.strip() == "same", r.stderr[-2000:]
        r = subprocess.run([sys.executable, "-c", check, url.replace("vgg19", "nothere"), "-"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode != 0 and "nothere" in r.stderr, r.stderr[-2000:]
    finally:
        server.shutdown()


def test_teacher_learns_from_labels_or_from_captions_alone(tmp_path, capsys):
    """objective auto: every label of labelled shards; the captions of caption-only shards
    (img2dataset's layout), whose loss must fall. labels on caption-only shards is refused.
    (Catches auto -> labels only, a caption loss that does not train, a labels list narrowed.)"""
    from sdn_dist.apps.teacher import train_teacher
    from sdn_dist.data.convert import convert_folder
    from sdn_dist.model.teacher import load_teacher_weights
    cfg = load_config("debug", overrides=["teacher.train.steps=30"])

    web = img2dataset_folder(tmp_path)
    res = train_teacher(cfg, shards=str(web), out=str(tmp_path / "cap.pt"), progress=False)
    assert res["objective"] == "caption" and res["labels"] == []
    assert res["final_loss"] < 0.9, res       # cosine distance, 1.0 or more for an untrained head
    assert 0 < res["accuracy"]["caption_cosine"] <= 1
    _, meta = load_teacher_weights(str(tmp_path / "cap.pt"))
    assert meta["objective"] == "caption"
    assert "objective caption" in capsys.readouterr().out

    shards = tmp_path / "shards"
    convert_folder(labelled_folder(tmp_path), labelled_folder(tmp_path) / "captions.jsonl", str(shards),
                   test_fraction=0.2, per_shard=10, progress=False)
    res = train_teacher(cfg, shards=str(shards), out=str(tmp_path / "lab.pt"), progress=False)
    assert res["objective"] == "labels" and res["labels"] == ["label"]
    assert "objective labels: labels label (3 classes)" in capsys.readouterr().out

    with pytest.raises(DataError, match="no usable labels for teacher.train.objective=labels"):
        train_teacher(load_config("debug", overrides=["teacher.train.objective=labels"]), shards=str(web),
                      out=str(tmp_path / "x.pt"), progress=False)
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- train and test never mix

def _split_dir(root: Path) -> Path:
    for name in ("train-000000.tar", "train-000001.tar", "test-000000.tar"):
        (root / name).write_bytes(b"")
    return root


def test_a_directory_as_training_data_never_yields_a_test_shard(tmp_path, caplog):
    """(Catches the directory expanding to every tar again, or the split ignored.)"""
    from sdn_dist.data.shards import expand_urls
    d = _split_dir(tmp_path)
    caplog.set_level("INFO", logger="sdn_dist")
    train = expand_urls(str(d), split="train")
    assert [Path(u).name for u in train] == ["train-000000.tar", "train-000001.tar"]
    assert "its 2 train-* shards (of 3 tars) used as train data" in caplog.text
    assert [Path(u).name for u in expand_urls([str(d)], split="test")] == ["test-000000.tar"]
    assert len(expand_urls(str(d))) == 3                              # no split asked: every tar
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "00000.tar").write_bytes(b"")
    assert len(expand_urls(str(plain), split="test")) == 1           # no named split: all of them
    (tmp_path / "test-000000.tar").unlink()
    with pytest.raises(DataError, match="holds train-\\* shards but no test-\\* shards"):
        expand_urls(str(d), split="test")


def test_training_data_and_teacher_from_a_directory_see_no_test_sample(tmp_path):
    """Through the run's own data plan (DataSpec) and the teacher: a directory with both splits."""
    from sdn_dist.apps.teacher import _scan
    from sdn_dist.data.convert import convert_folder
    from sdn_dist.data.readers import DataSpec
    from sdn_dist.data.shards import expand_urls
    photos = labelled_folder(tmp_path)
    res = convert_folder(photos, photos / "captions.jsonl", str(tmp_path / "sh"), test_fraction=0.25,
                         per_shard=9, progress=False)
    cfg = load_config("debug", overrides=[f"data.train={tmp_path / 'sh'}"])
    spec = DataSpec.build(cfg.data, cfg.text, cfg.model, cfg.seed)
    assert spec.urls == res["train"] and sum(spec.counts) == res["counts"]["train"]
    _, held, metas, _, n = _scan(expand_urls(str(tmp_path / "sh"), split="train"), 32, 8, 0)
    assert n == res["counts"]["train"] and all(m["split"] == "train" for m in metas)


def test_directory_split_on_s3(s3, tmp_path):
    from sdn_dist.data.shards import expand_urls
    for name in ("train-000000.tar", "test-000000.tar"):
        s3.fs.pipe(s3.url("sh", name).split("://", 1)[1], b"")
    got = expand_urls(s3.url("sh"), split="train")
    assert [u.rsplit("/", 1)[-1] for u in got] == ["train-000000.tar"]


# ---------------------------------------------------------------- converters cannot leak

@pytest.mark.parametrize("rel, says", [
    ("/etc/hostname", "is an absolute path"),
    ("../outside.png", "climbs out of --images"),
    ("link.png", "is a symlink out of --images"),
    ("linkdir/outside.png", "is a symlink out of --images"),
])
def test_convert_folder_never_reads_outside_images(tmp_path, rel, says):
    """(Catches each of the three checks removed: the file outside would be read into the shards.)"""
    photos = labelled_folder(tmp_path, n=3)
    (tmp_path / "outside.png").write_bytes((photos / "000.jpg").read_bytes())
    (photos / "link.png").symlink_to(tmp_path / "outside.png")
    (photos / "linkdir").symlink_to(tmp_path)
    (photos / "inside.png").symlink_to(photos / "000.jpg")        # a link that stays inside is fine
    lines = (photos / "captions.jsonl").read_text().splitlines()
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(lines[:2] + [json.dumps({"image": rel, "caption": "x"})]) + "\n")
    r = cli("shards", "convert", "folder", "--images", photos, "--captions", caps, "--out", tmp_path / "out")
    error_line(r, f"{caps}:3", repr(rel), says)
    assert not (tmp_path / "out").exists()
    caps.write_text("\n".join(lines[:2] + [json.dumps({"image": "inside.png", "caption": "x"})]) + "\n")
    assert cli("shards", "convert", "folder", "--images", photos, "--captions", caps,
               "--out", tmp_path / "out").returncode == 0
