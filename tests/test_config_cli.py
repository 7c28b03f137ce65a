"""Config tree and CLI surface (fast tier)."""

import subprocess
import sys

import pytest
import yaml

from sdn_dist.cli import main
from sdn_dist.config import PRESETS, ConfigError, describe, load_config

SDN = [sys.executable, "-m", "sdn_dist"]


def run_cli(*args):
    return subprocess.run(SDN + list(args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    """Every value the preset sets is in the resolved config, and its batch splits over its workers.
    Fails on: load_config resolving the defaults (or another preset) under the preset's name."""
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.data.batch_size % (cfg.workers * cfg.deepspeed.grad_accum) == 0
    resolved = cfg.model_dump()

    def leaves(tree, prefix=()):
        for k, v in tree.items():
            yield from leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)]

    checked = 0
    for path, value in leaves(PRESETS[preset]):
        got = resolved
        for k in path:
            got = got[k]
        assert got == value, ".".join(path)
        checked += 1
    assert checked >= 5


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


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_an_elastic_run_is_accepted_at_every_zero_stage(zero):
    """An elastic run resumes ZeRO 1-3 optimizer state on another number of workers (the
    Checkpointer converts it, tests/test_zero_resize.py), so the config takes ``workers=1-2`` with
    any ``deepspeed.zero_stage``. Fails on: the former refusal of ZeRO 1-3 with a range kept."""
    assert load_config("debug", overrides=["workers=1-2", f"deepspeed.zero_stage={zero}"]).workers == "1-2"
    assert load_config("debug", overrides=["workers=2", f"deepspeed.zero_stage={zero}"]).workers == 2


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


# ------------------------------------------------------------------ config quirks (issue 33)

def test_point_weights_merge_from_a_file_as_from_set(tmp_path):
    """``stageN.point_weights`` merges key by key in every layer: a file's mapping keeps the
    recipe's (or preset's) other weights, as ``--set stage1.point_weights.X=`` does, and so does a
    whole mapping given to --set. Fails on: deep_merge or --set replacing the dict."""
    base = load_config(None, recipe="synth").stage2.point_weights
    assert base == {"image": 60.0}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"stage2": {"point_weights": {"conv1_1": 2.0}}}))
    by_file = load_config(None, file=f, recipe="synth").stage2.point_weights
    by_set = load_config(None, recipe="synth", overrides=["stage2.point_weights.conv1_1=2"]).stage2.point_weights
    by_dict = load_config(None, recipe="synth", overrides=["stage2.point_weights={conv1_1: 2}"]).stage2.point_weights
    assert by_file == by_set == by_dict == {"image": 60.0, "conv1_1": 2.0}


def test_a_section_given_whole_to_set_merges_into_the_preset():
    """``--set stage1={lr: 0.5}`` changes stage 1's lr and keeps the preset's steps.
    Fails on: --set replacing the section (the preset's values fall back to the defaults)."""
    cfg = load_config("debug", overrides=["stage1={lr: 0.5}"])
    assert (cfg.stage1.lr, cfg.stage1.steps) == (0.5, PRESETS["debug"]["stage1"]["steps"])


@pytest.mark.parametrize("key", ["stage2.plateau.patience=3", "stage2.plateau.min_delta=0.1"])
def test_the_plateau_rule_belongs_to_stage_one_only(key):
    """The plateau rule ends stage 1; under stage 2 it would be accepted and do nothing, so it is
    an unknown key there (exit 2 naming it) and --docs lists it under stage 1 only.
    Fails on: StageConfig (both stages) carrying ``plateau`` again."""
    with pytest.raises(ConfigError, match=rf"'{key.split('=')[0]}'"):
        load_config("debug", overrides=[key])
    keys = {k for k, _, _ in describe()}
    assert {"stage1.plateau.patience", "stage1.plateau.min_delta"} <= keys
    assert not any(k.startswith("stage2.plateau") for k in keys)
    assert load_config("debug", overrides=["stage1.plateau.patience=3"]).stage1.plateau.patience == 3


def test_config_docs_print_a_literals_values(capsys):
    """`config show --docs` gives the allowed values of a choice key. Fails on: printing `Literal`."""
    assert main(["config", "show", "--docs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "l1|l2" in rows["stage1.loss"] and "auto|labels|caption" in rows["teacher.train.objective"]
    assert "Literal" not in out


def test_a_closed_stdout_ends_the_command_quietly():
    """`sdn-dist config show --docs | head -1`: the reader goes away; the command exits 0 with
    nothing on stderr. Fails on: no BrokenPipeError handling in cli.main (a traceback, exit 1)."""
    p = subprocess.Popen(SDN + ["config", "show", "--docs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()        # before it writes: every write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


@pytest.mark.parametrize("flags, shown", [([], ["info"]), (["-q"], []), (["-v"], ["debug", "info"])])
def test_log_level_flags(flags, shown):
    """-v shows the sdn_dist log's debug lines, -q only warnings; INFO by default.
    Fails on: the flags not reaching the sdn_dist logger."""
    code = ("import logging, sys; from sdn_dist import cli; "
            "a = cli.build_parser().parse_args(sys.argv[1:] + ['config', 'show']); cli._setup_logging(a.log_level); "
            "log = logging.getLogger('sdn_dist.x'); log.debug('debug'); log.info('info'); log.warning('warning')")
    r = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.split() == shown + ["warning"]


# ------------------------------------------------------------------ logs

def _records(steps, stage=1):
    return [{"step": s, "stage": stage, "rank": 0, "loss": 1.0 / s, "samples_per_sec": 10.0} for s in steps]


def test_training_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    """`sdn-dist train`'s progress: tqdm only when stderr is a terminal; otherwise (ray job submit,
    a RayJob's log) about twenty plain log lines a run, the last at the final step, and no bar.
    Fails on: the bar drawn whatever stderr is (carriage returns filling a log file), the plain
    lines missing or written every step."""
    import logging

    from sdn_dist.training.driver import Progress
    cfg = load_config("debug", overrides=["stage1.steps=40", "stage2.steps=40"])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec.getMessage())
    log = logging.getLogger("sdn_dist.training.driver")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        p = Progress(cfg, enabled=True)           # under pytest stderr is not a terminal
        assert p.bar is None
        for s in range(1, 41):
            p.update(_records([s]))
        p.update(_records(range(41, 81), stage=2))  # a drain may bring several steps at once
        p.close()
        assert 10 <= len(lines) <= 21 and lines[-1].startswith("step 80/80  stage 2")
        lines.clear()
        quiet = Progress(cfg, enabled=False, tty=False)
        quiet.update(_records(range(1, 81)))
        assert quiet.bar is None and lines == []
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    bar = Progress(cfg, enabled=True, tty=True)
    assert bar.bar is not None
    bar.update(_records([5]))
    assert bar.bar.n == 5 and lines == []
    bar.close()


def test_an_error_reads_as_one_line_wherever_it_was_raised():
    """errors.error_line is how every entry point prints an error: a UserError's message on one line,
    also when it comes back from a Ray worker as Ray's dual-class wrapper (whose own message is the
    remote traceback); anything else with its type. Fails on: the wrapper's traceback printed, a
    multi-line message left multi-line, or a bug's type dropped."""
    from ray.exceptions import RayTaskError

    from sdn_dist.errors import DataError, error_line
    cause = DataError("shard s3://b/train-0.tar sample 7:\nnot a PNG")
    try:
        raise cause
    except DataError as e:
        wrapped = RayTaskError("ShardReader.next", "Traceback (most recent call last):\n  ...", e).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and "not a PNG" not in str(wrapped)   # its message: where it ran
    assert error_line(wrapped) == "error: shard s3://b/train-0.tar sample 7: not a PNG"
    assert error_line(cause) == error_line(wrapped)
    assert error_line(KeyError("fc7")) == "error: KeyError: 'fc7'"


@pytest.mark.parametrize("fit_running", [True, False])
def test_a_preempted_train_leaves_without_rays_shutdown_while_fit_still_runs(monkeypatch, capsys, fit_running):
    """Exit 75 after a preemption whose Ray Train fit() is still blocked in the driver's other
    thread goes through os._exit, past Ray's at-exit shutdown (it crashed under that thread:
    SIGSEGV, exit -11); when fit() has ended, the normal exit (Ray shuts down cleanly)."""
    import os

    import sdn_dist.training.driver as driver
    monkeypatch.setattr(driver, "run_training", lambda cfg, progress: {
        "out": "o", "run_id": "r", "preempted": 7, "exit_status": 75, "summary": None, "fit_running": fit_running})
    exits = []

    def fake_exit(status):
        exits.append(status)
        raise SystemExit(status)
    monkeypatch.setattr(os, "_exit", fake_exit)
    try:
        status = main(["train", "--preset", "debug", "--quiet"])
    except SystemExit as e:
        status = e.code
    assert status == 75 and exits == ([75] if fit_running else [])
    assert "preempted at step 7" in capsys.readouterr().err
