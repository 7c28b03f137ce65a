"""Config tree and CLI surface (fast tier)."""

import subprocess
import sys

import pytest
import yaml

from sdn_dist.commands.cli import main
from sdn_dist.config import PRESETS, ConfigError, describe, load_config

SDN = [sys.executable, "-m", "sdn_dist"]


def run_cli(*args):
    return subprocess.run(SDN + list(args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.data.batch_size % (cfg.workers * cfg.deepspeed.grad_accum) == 0


def test_contract_keys_exist():
    keys = {k for k, _, _ in describe()}
    for k in ["data.train", "data.test", "stage1.steps", "stage2.steps", "workers", "out",
              "metrics.port", "teacher.weights"]:
        assert k in keys


def test_every_field_is_documented():
    undocumented = [k for k, _, doc in describe() if not doc]
    assert undocumented == []


def test_precedence_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"preset": "debug", "stage1": {"steps": 5, "lr": 0.5}, "workers": 2}))
    cfg = load_config(None, file=f, overrides=["stage1.steps=7", "data.train=[a.tar, b.tar]"])
    assert cfg.preset == "debug"            # the file's preset wins over the default
    assert cfg.stage1.steps == 7            # --set beats the file
    assert cfg.stage1.lr == 0.5             # the file beats the preset
    assert cfg.stage2.steps == PRESETS["debug"]["stage2"]["steps"]
    assert cfg.data.train == ["a.tar", "b.tar"]


@pytest.mark.parametrize("override, fragment", [
    ("nosuch.key=1", "'nosuch.key'"),
    ("stage1.steps=abc", "'stage1.steps'"),
    ("stage1.nosuch=1", "'stage1.nosuch'"),
    ("stage1.steps=-1", "'stage1.steps'"),
    ("model.pool=median", "'model.pool'"),
    ("data.batch_size=7", "data.batch_size=7"),
    ("preset=huge", "unknown preset 'huge'"),
    ("workers=3-4", "workers=3-4 (at 3 workers) x deepspeed.grad_accum = 3 x 1"),  # batch 8: by 4, not by 3
    ("workers=3-1", "workers='3-1': need 1 <= MIN <= MAX"),
    ("workers=two", "workers='two'"),
    ("novalue", "key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides=[override, "workers=2"] if "batch" in override else [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_workers_range_keeps_the_global_batch_at_every_size():
    cfg = load_config("debug", overrides=["workers=1-2", "data.batch_size=8"])
    assert (cfg.workers, cfg.min_workers, cfg.max_workers) == ("1-2", 1, 2)
    assert [cfg.micro_batch_at(w) for w in (1, 2)] == [8, 4]
    assert load_config("debug", overrides=["workers=2-2"]).workers == 2   # a one-size range is fixed


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("debug", file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("debug", file=bad)


@pytest.mark.parametrize("override, key", [("nosuch.key=1", "nosuch.key"), ("stage1.steps=abc", "stage1.steps"),
                                           ("workers=3-4", "workers=3-4 (at 3 workers)")])
def test_train_cli_bad_key_exits_2_with_one_line(override, key):
    r = run_cli("train", "--set", override)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "--preset", "demo", "--set", "stage2.steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage2"]["steps"] == 3 and shown["preset"] == "demo"
    # the printed YAML is the whole resolved tree, every key and value
    assert shown == load_config("demo", overrides=["stage2.steps=3"]).model_dump(mode="json")


def test_help_on_every_command():
    for cmd in [[], ["train"], ["shards", "synth"], ["shards", "convert", "folder"], ["shards", "inspect"],
                ["teacher", "train"], ["model"], ["generate"], ["eval"], ["bench"], ["demo"]]:
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, cmd
