"""Faults, bad input and hostile input (docs/reliability.md lists every case and its test).

Fast tier: bad and hostile input that fails before anything starts. Slow tier: real runs that are
killed, interrupted or starved of disk, and must finish (or stop cleanly) with no lost or doubled
steps.
"""

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SDN = [sys.executable, "-m", "sdn_dist"]


def cli(*args, timeout=600, **kw):
    return subprocess.run(SDN + list(args), capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sdn_dist.apps.synth.dataset import make_synth
    d = tmp_path_factory.mktemp("rel-shards")
    make_synth(out=str(d), train=48, test=8, size=32, per_shard=16, seed=3, progress=False)
    return d


def base_args(out, shards):
    return ["train", "--preset", "debug", "--quiet", "--set", f"out={out}",
            "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar"]


def sets(*kv):
    out = []
    for s in kv:
        out += ["--set", s]
    return out


def events(out):
    p = Path(out) / "events.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines(keepends=True) if l.endswith("\n")] if p.exists() else []   # not a line being written


def records(out):
    p = Path(out) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines(keepends=True) if l.endswith("\n")] if p.exists() else []   # not a line being written


def finals(out):
    return [e for e in events(out) if e["event"] == "final"]


def wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ bad input (fast)

def test_missing_shards_exit_2_naming_them(tmp_path):
    r = cli("train", "--quiet", "--set", f"out={tmp_path}/run", "--set", f"data.train={tmp_path}/nope/train-*.tar", timeout=120)
    one_line_error(r, "nope")


def test_not_a_tar_exit_2_naming_it(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 100)
    r = cli("train", "--quiet", "--set", f"out={tmp_path}/run", "--set", f"data.train={bad}", timeout=120)
    one_line_error(r, str(bad))
    r = cli("shards", "inspect", str(bad), timeout=120)
    one_line_error(r, str(bad))


def test_empty_shard_dir_and_empty_tar_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("train", "--quiet", "--set", f"out={tmp_path}/r1", "--set", f"data.train={empty}", timeout=120), "empty")
    t = tmp_path / "zero.tar"
    with tarfile.open(t, "w"):
        pass
    one_line_error(cli("train", "--quiet", "--set", f"out={tmp_path}/r2", "--set", f"data.train={t}", timeout=120), "zero.tar")


@pytest.mark.parametrize("override, key", [
    ("stage1.steps=-3", "stage1.steps"), ("workers=two", "workers"), ("data.batch_size=0", "data.batch_size"),
    ("model.width=3", "model.width"), ("metrics.port=70000", "metrics.port"), ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("stage1.loss=huber", "stage1.loss"), ("text.encoder=bert", "text.encoder"), ("stage2.lr=0", "stage2.lr"),
])
def test_bad_values_exit_2_naming_the_key(tmp_path, override, key):
    one_line_error(cli("train", "--set", override, timeout=120), key)


def test_batch_not_divisible_by_workers_times_accumulation():
    one_line_error(cli("train", "--set", "workers=3", "--set", "data.batch_size=8", timeout=120), "data.batch_size=8", "3 x 1")


def test_teacher_of_wrong_architecture_exit_2_before_ray(tmp_path, shards):
    import torchvision
    w = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), w)
    t0 = time.time()
    r = cli(*base_args(tmp_path / "run", shards), "--set", f"teacher.weights={w}", timeout=120)
    one_line_error(r, "resnet.pt")
    assert time.time() - t0 < 60


def test_unwritable_out_exit_2(tmp_path, shards):
    blocker = tmp_path / "afile"
    blocker.write_text("a file where the run directory should go")
    r = cli(*base_args(blocker / "run", shards), timeout=120)
    one_line_error(r, "afile")


# ------------------------------------------------------------------ hostile input (fast)

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# A hostile DeepSpeed checkpoint through Checkpointer.load: tests/test_checkpoint.py.


def test_hostile_exported_student_and_teacher_files_are_refused(tmp_path, shards):
    marker = tmp_path / "pwned"
    f = tmp_path / "student.pt"
    torch.save({"format": "sdn-dist-student/1", "x": _Evil(marker)}, f)
    r = cli("generate", "--checkpoint", str(f), "--text", "a red circle", "--out", str(tmp_path / "g"), timeout=120)
    one_line_error(r, "student.pt")
    t = tmp_path / "teacher.pt"
    torch.save({"features.0.weight": _Evil(marker)}, t)
    r = cli(*base_args(tmp_path / "run", shards), "--set", f"teacher.weights={t}", timeout=120)
    one_line_error(r, "teacher.pt")
    assert not marker.exists()


# What may turn bytes into code. torch.load is checked separately (it must say weights_only=True).
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
_PICKLE_HARMLESS = {"UnpicklingError", "PicklingError", "PickleError", "HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL"}
_YAML_SAFE = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "dump", "YAMLError", "SafeLoader", "SafeDumper"}
# The documented exception: the user-invoked StackGAN converter's restricted latin1 unpickler.
_PICKLE_ALLOWED_IN = {("sdn_dist/data/convert.py", "_StackGANUnpickler"), ("sdn_dist/data/convert.py", "load_stackgan_pickle")}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_deserialisation(src: str, relpath: str) -> list[str]:
    """Every place in ``src`` that could run code while reading data, found on the syntax tree
    (a regex missed ``torch.load(f)`` without weights_only, ``pickle.Unpickler``, ``yaml.unsafe_load``)."""
    tree = ast.parse(src)
    aliases: dict[str, str] = {}   # local name -> module.attr it stands for
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom) and n.module:
            for a in n.names:
                aliases[a.asname or a.name] = f"{n.module}.{a.name}"
    found = []

    def visit(node, owner):
        for child in ast.iter_child_nodes(node):
            name = owner
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and owner is None:
                name = child.name
            where = f"{relpath}:{getattr(child, 'lineno', '?')}"
            if isinstance(child, (ast.Attribute, ast.Name)) and not isinstance(getattr(child, "ctx", None), ast.Store):
                d = _dotted(child)
                head, _, rest = d.partition(".")
                full = aliases.get(head, head) + (f".{rest}" if rest else "")
                mod, _, attr = full.partition(".")
                if mod in _PICKLE_MODULES and attr and attr.split(".")[0] not in _PICKLE_HARMLESS and (relpath, owner) not in _PICKLE_ALLOWED_IN:
                    found.append(f"{where}: {d}")
                if mod == "yaml" and attr and attr.split(".")[0] not in _YAML_SAFE:
                    found.append(f"{where}: {d}")
            if isinstance(child, ast.Call):
                d = _dotted(child.func)
                head, _, rest = d.partition(".")
                full = aliases.get(head, head) + (f".{rest}" if rest else "")
                kw = {k.arg: k.value for k in child.keywords}
                if full in ("torch.load", "torch.serialization.load"):
                    v = kw.get("weights_only")
                    if not (isinstance(v, ast.Constant) and v.value is True):
                        found.append(f"{where}: {d}( without weights_only=True")
                if full in ("numpy.load", "np.load") and not (isinstance(kw.get("allow_pickle"), ast.Constant)
                                                              and kw["allow_pickle"].value is False):
                    found.append(f"{where}: {d}( without allow_pickle=False")
                if isinstance(child.func, ast.Name) and child.func.id in ("eval", "exec", "compile") \
                        and child.func.id not in aliases:
                    found.append(f"{where}: {child.func.id}(")
            visit(child, name)

    visit(tree, None)
    return found


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(f)", "import torch\ntorch.load(f, weights_only=False)", "from torch import load\nload(f)",
    "import torch as t\nt.load(f, map_location='cpu')", "import pickle\npickle.Unpickler(f).load()",
    "import pickle\npickle.loads(b)", "from pickle import Unpickler\nclass U(Unpickler): pass",
    "import yaml\nyaml.unsafe_load(s)", "import yaml\nyaml.load(s, Loader=yaml.Loader)", "import yaml\nyaml.full_load(s)",
    "import numpy as np\nnp.load(f, allow_pickle=True)", "eval(s)", "exec(s)", "import marshal\nmarshal.loads(b)",
    "import dill\ndill.load(f)",
])
def test_unsafe_deserialisation_check_catches(snippet):
    assert unsafe_deserialisation(snippet, "sdn_dist/x.py")


def test_no_unsafe_deserialisation_in_the_package():
    """Nothing read from shards, checkpoints or weight files can run code: every torch.load says
    weights_only=True, and the only unpickler is the documented, user-invoked StackGAN reader."""
    offenders = []
    for p in sorted((REPO / "sdn_dist").rglob("*.py")):
        offenders += unsafe_deserialisation(p.read_text(), p.relative_to(REPO).as_posix())
    assert offenders == []
    # the allowed reader is still where the exception says (a rename must not widen the exception)
    assert unsafe_deserialisation((REPO / "sdn_dist/data/convert.py").read_text(), "elsewhere.py")


def test_endpoints_default_to_loopback(monkeypatch):
    """The metrics endpoint and the embedded Ray (its node address, dashboard and state API) listen
    on 127.0.0.1 unless told otherwise: what ``init_ray`` hands ``ray.init`` for a local run.
    Fails on: any of them bound to 0.0.0.0 or the machine's address by default."""
    import ray

    from sdn_dist.config import load_config
    from sdn_dist.training import driver
    for preset in ("debug", "demo", "paper"):
        cfg = load_config(preset)
        assert cfg.metrics.host == "127.0.0.1"
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    driver.init_ray(load_config("debug", overrides=["ray.dashboard=true"]))
    (kw,) = calls
    assert kw["address"] == "local" and kw["include_dashboard"] is True
    assert kw["dashboard_host"] == "127.0.0.1" and kw["_node_ip_address"] == "127.0.0.1"
    assert kw["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")


# ------------------------------------------------------------------ faults (slow)

@pytest.mark.slow
def test_sigkill_data_actor_run_completes(tmp_path, shards):
    out = tmp_path / "run"
    # A debug step takes ~20 ms: stage 1 is long enough (seconds) that the kill lands inside it
    # even on a fast, quiet machine (with 30 steps the run could finish before the kill).
    proc = subprocess.Popen(SDN + base_args(out, shards) + sets("stage1.steps=600", "stage2.steps=10", "checkpoint.every=10"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(r["step"] >= 12 for r in records(out)), what="step 12")
        import psutil
        # this run's reader actors only: descendants of our driver (its embedded Ray), never
        # another Ray's on the same machine
        readers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                   if "ray::ShardReader" in " ".join(p.cmdline())]
        assert readers, "no reader actor process found"
        os.kill(readers[0], signal.SIGKILL)
        at_kill = max(r["step"] for r in records(out))
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert at_kill < 600, f"the kill landed after stage 1 (step {at_kill}): the test did not test anything"
    assert proc.returncode == 0, stderr[-3000:]
    assert {e["step"] for e in finals(out)} == {610}
    assert any(e["event"] == "message" and "resumed from" in e["text"] for e in events(out))


def test_sigkilled_teacher_peer_is_named_and_nothing_is_written(tmp_path, shards):
    """`sdn-dist teacher train` with teacher.train.processes=2, one of its spawned ranks SIGKILLed in
    the middle of training (the OOM killer, a stray kill): exit 1 with one line that names that
    rank, its pid and the signal, instead of the surviving rank's gloo "connection reset by peer",
    and no teacher file, not even a temporary one. Fails on: the survivors' error reported before
    the killed rank."""
    import threading

    import psutil
    out = tmp_path / "teacher.pt"
    proc = subprocess.Popen(SDN + ["teacher", "train", "--preset", "debug", "--shards", f"{shards}/train-*.tar",
                                   "--out", str(out)] + sets("teacher.train.steps=100000", "teacher.train.processes=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        # training under way: rank 0's progress past step 0 (the peer has joined the group); stderr
        # is a pipe, so plain lines ("teacher step 1/100000"), not a bar
        wait_for(lambda: re.search(r"teacher step [1-9]\d*/100000", "".join(err)), timeout=120, what="the first steps")
        ranks = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(ranks) == 2, ranks
        victim = max(ranks, key=lambda p: p.pid)       # either rank: the message names the one killed
        os.kill(victim.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        proc.kill()
    stderr = "".join(err)
    assert proc.returncode == 1, stderr[-3000:]
    assert re.search(rf"its rank sdn-teacher-rank[01] \(pid {victim.pid}\) was killed by signal 9", stderr), stderr[-3000:]
    assert "nothing was written to" in stderr and not list(tmp_path.glob("teacher.pt*"))


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes_without_lost_or_doubled_steps(tmp_path, shards):
    out = tmp_path / "run"
    args = SDN + base_args(out, shards) + sets("stage1.steps=20", "stage2.steps=300", "checkpoint.every=5")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: any(r["step"] >= 24 and r["stage"] == 2 for r in records(out)), what="stage 2")
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and the embedded Ray it started
    proc.wait(timeout=60)
    assert not finals(out)
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {e["step"] for e in finals(out)} == {320}
    resumed = [e["text"] for e in events(out) if e["event"] == "message" and "resumed from" in e["text"]]
    assert resumed and "in stage 2" in resumed[-1]
    # the rerun started at the last complete checkpoint: every step after it was run exactly once
    ckpt_step = int(re.search(r"step-(\d+)", resumed[-1]).group(1))
    attempts = sorted({r["attempt"] for r in records(out)})
    last = [r for r in records(out) if r["attempt"] == attempts[-1] and r["rank"] == 0]
    assert ckpt_step < 320 and [r["step"] for r in last] == list(range(ckpt_step + 1, 321))
    # the rerun's recovery is dated from the killed attempt's last record, and shows in goodput
    (rec,) = [e for e in events(out) if e["event"] == "recovered"]
    killed_last = max(r["time"] for r in records(out) if r["attempt"] == attempts[0])
    assert (rec["cause"], rec["step"], rec["attempt"]) == ("rerun", ckpt_step, attempts[-1])
    assert rec["fault_time"] >= killed_last and rec["seconds"] > 0
    (summary,) = [e for e in events(out) if e["event"] == "summary"]
    assert summary["steps"] == 320 and summary["recoveries"] == 1 and 0 < summary["goodput"] < 1
    assert "goodput" in r.stdout


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_75(tmp_path, shards):
    """A SIGTERM to the run's whole process group (`kill -- -PGID`, a batch scheduler's or systemd's
    stop) reaches the driver, the workers and the embedded Ray (GCS, raylet, the record collector)
    at once. The workers checkpoint if their Ray lets them; the driver waits within
    checkpoint.preempt_grace_seconds and leaves with 75 and its summary, whether the ranks' preempted
    record reached it or the collector died first (then the driver's drain fails: still 75). It
    used to wait on the dead GCS for 60 s and exit 1 without a summary (the cancel of a resource
    request an embedded Ray does not need), or exit 1 at once when the collector died first."""
    out = tmp_path / "run"
    grace = 8
    args = SDN + base_args(out, shards) + sets("workers=2", "stage1.steps=100000", "stage2.steps=2",
                                               f"checkpoint.preempt_grace_seconds={grace}")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: any(r["step"] >= 20 for r in records(out)), what="step 20")
        signalled = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.time() - signalled
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, (proc.returncode, round(took, 1), stderr[-2000:])
    assert took < grace + 10, took
    for pre in [e for e in events(out) if e["event"] == "preempted"]:   # none when the collector died first
        assert (out / "checkpoints" / f"step-{pre['step']:08d}" / "COMPLETE").exists()
    assert [e["event"] for e in events(out)][-1] == "summary" and "goodput" in stdout


def _incomplete(ck: Path) -> list[str]:
    """Checkpoint directories being written: without COMPLETE and newer than every complete one
    (an older one without its marker is being pruned, and may be gone before the kill lands)."""
    try:
        entries = [(e.name, os.path.exists(os.path.join(e.path, "COMPLETE"))) for e in os.scandir(ck) if e.name.startswith("step-")]
    except FileNotFoundError:
        return []
    newest_complete = max((name for name, complete in entries if complete), default="")
    return sorted(name for name, complete in entries if not complete and name > newest_complete)


@pytest.mark.slow
def test_checkpoint_interrupted_mid_write_is_removed_and_never_resumed(tmp_path, shards):
    """SIGKILL the whole run (driver and its embedded Ray) while a checkpoint directory exists
    without its COMPLETE marker; the rerun must remove it before training and resume from the
    last complete one."""
    out = tmp_path / "run"
    ck = out / "checkpoints"
    killed_in = []
    for attempt in range(3):   # the kill can miss a ~10 ms write window; then the rerun tries again
        pids: list[int] = []
        log = tmp_path / f"attempt-{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(SDN + base_args(out, shards) + sets("stage1.steps=4", "stage2.steps=2000", "checkpoint.every=1"),
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # step-00000008 itself may be pruned (checkpoint.keep) before a poll sees it
            wait_for(lambda: any(int(p.parent.name[5:]) >= 8 for p in ck.glob("step-*/COMPLETE")) or proc.poll() is not None,
                     timeout=600, what="a complete checkpoint at step 8 or later")
            # Every process of the run, listed before the watch (Ray's workers are not all in the
            # driver's process group, and a surviving worker would go on to complete the
            # checkpoint after the "kill"), so that the kill itself takes microseconds.
            import psutil
            with contextlib.suppress(psutil.NoSuchProcess):
                pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            # the training workers (they write the checkpoint) first
            ranks = {r["pid"] for r in records(out)}
            pids = sorted(pids, key=lambda pid: pid not in ranks)
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and not _incomplete(ck):
                time.sleep(0.001)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # anything started since the list, while the driver still holds its children
            with contextlib.suppress(psutil.NoSuchProcess):
                for c in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        c.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]   # killed, not ended by itself
        killed_in = _incomplete(ck)
        if killed_in:
            break
    assert killed_in, "no kill landed inside a checkpoint write"
    tag = killed_in[0]
    done = sorted(p.parent.name for p in ck.glob("*/COMPLETE"))
    assert done, "killed before any checkpoint was complete"
    end = max(int(tag.split("-")[1]), int(done[-1].split("-")[1])) + 3
    # Rerun to 3 steps past both, checkpointing only at the end: the interrupted directory must be
    # gone (removed at start), not just overwritten by a new save of the same step.
    r = cli(*base_args(out, shards), *sets("stage1.steps=4", f"stage2.steps={end - 4}", "checkpoint.every=100000"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (ck / tag).exists()
    resumed = [e["text"] for e in events(out) if e["event"] == "message" and "resumed from" in e["text"]]
    assert resumed and re.search(r"step-\d+", resumed[-1]).group(0) == done[-1]
    assert {e["step"] for e in finals(out)} == {end}
    # the same out with another model: stopped by the preflight (it used to be a "size mismatch"
    # traceback from inside the workers), naming the key; the run directory stays byte for byte
    # as it was (config.yaml, metrics.jsonl, events.jsonl, checkpoints, ray/: every file)
    before = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    t0 = time.time()
    r = cli(*base_args(out, shards), *sets("stage1.steps=4", f"stage2.steps={end - 4}", "model.width=0.125"))
    one_line_error(r, "model.width=0.0625 there", "model.width=0.125 now")
    assert "Ray cluster" not in r.stderr and time.time() - t0 < 60
    after = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    assert sorted(after) == sorted(before) and [k for k in before if before[k] != after[k]] == []


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, parents: bool = False):
    """A real, tiny filesystem to fill: a tmpfs of ``size`` mounted at ``path`` (needs root)."""
    path.mkdir(parents=parents)
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    assert m.returncode == 0, f"this test needs root to mount a small tmpfs: {m.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_torch_writer_full_disk_is_reported_as_no_space(tmp_path):
    """torch.save's C++ writer turns ENOSPC into a RuntimeError ("unexpected pos ..."); the
    product must still say "No space left on device" and name the file (a CI run once exited 1)."""
    from sdn_dist import fsio
    from sdn_dist.errors import UserError

    with small_tmpfs(tmp_path / "tiny", "1m") as mnt:
        target = str(mnt / "big.pt")
        with pytest.raises(UserError, match=f"cannot write {re.escape(target)}: No space left on device") as ei:
            with fsio.writing(target):
                torch.save({"w": torch.zeros(1 << 19)}, target)
        assert isinstance(ei.value.__cause__, RuntimeError)   # the path under test, not a plain OSError
        assert not list(mnt.glob(".write-probe-*"))


_LOAD_INTO_DEEPSPEED = """
import json, os, sys, torch, torch.distributed as dist, yaml
from sdn_dist.config import Config
from sdn_dist.data.text import build_text_encoder
from sdn_dist.training.checkpoint import Checkpointer
from sdn_dist.training.loop import build_engine, student_state_dict
from sdn_dist.training.state import StageSchedule, TrainState
out, tag = sys.argv[1:3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = Config.model_validate(yaml.safe_load(open(os.path.join(out, "config.yaml"))))
cfg = cfg.model_copy(update={"out": out})
ck = Checkpointer(out, keep=100)
info = next(i for i in ck.complete() if i["tag"] == tag)
engine = build_engine(cfg, StageSchedule.from_stages(cfg.stage1, cfg.stage2).stage(info["stage"]).config, build_text_encoder(cfg.text).dim, torch.device("cpu"))
state = TrainState.start(cfg.stage1, cfg.stage2, 1)
ck.load(engine, tag, {"train": state}, module_only=False)
print(json.dumps({"step": state.data_position // cfg.data.batch_size, "stage": state.stage,
                  "params": sum(v.numel() for v in student_state_dict(engine).values())}))
"""


def load_into_deepspeed(out: Path, tag: str) -> dict:
    """Load a checkpoint into a real DeepSpeed engine built from the run's own config.yaml."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", _LOAD_INTO_DEEPSPEED, str(out), tag, str(port)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_disk_full_stops_at_once_with_clear_error_and_keeps_earlier_checkpoints(tmp_path, shards):
    """A 2.5 MB filesystem under out/checkpoints holds two debug checkpoints; the third fills it.
    With the default ray.max_failures a full disk is still not retried: it is the user's to fix."""
    out = tmp_path / "run"
    with small_tmpfs(out / "checkpoints", "2500k", parents=True) as ck:
        r = cli(*base_args(out, shards), *sets("stage1.steps=4", "stage2.steps=40", "checkpoint.every=4",
                                             "checkpoint.keep=10"))
        one_line_error(r, "No space left on device", f"cannot write checkpoint {ck}/step-")
        tags = sorted(p.name for p in ck.iterdir())
        done = sorted(p.parent.name for p in ck.glob("*/COMPLETE"))
        assert done[:2] == ["step-00000004", "step-00000008"], tags
        assert tags == done, "the half-written checkpoint was left behind"
        assert not [e for e in events(out) if "resumed from" in e.get("text", "")], "a full disk was retried"
        assert len({r["pid"] for r in records(out)}) == 1 and not finals(out)
        loaded = load_into_deepspeed(out, done[-1])   # what was kept really loads into DeepSpeed
        assert loaded["step"] == int(done[-1].split("-")[1]) and loaded["stage"] == 2 and loaded["params"] > 0


def test_odd_images_and_very_long_captions_are_read(tmp_path):
    """1x1, large, grayscale and palette images decode to RGB at the model size; a 100 KB caption
    is encoded, not fatal."""
    import io

    import webdataset as wds
    from PIL import Image

    from sdn_dist.config import TextConfig
    from sdn_dist.data.pipeline import iter_batches
    from sdn_dist.data.text import build_text_encoder

    def png(img):
        b = io.BytesIO()
        img.save(b, "PNG")
        return b.getvalue()

    path = tmp_path / "odd-000000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "tiny", "png": png(Image.new("RGB", (1, 1), (255, 0, 0))), "txt": b"a red dot"})
        w.write({"__key__": "big", "png": png(Image.new("RGB", (3000, 2000), (0, 255, 0))), "txt": b"green"})
        w.write({"__key__": "gray", "png": png(Image.new("L", (40, 40), 128)), "txt": b"gray"})
        w.write({"__key__": "pal", "png": png(Image.new("P", (20, 20), 3)), "txt": ("word " * 20000).encode()})
    enc = build_text_encoder(TextConfig(encoder="hash", dim=32))
    b = next(iter(iter_batches(str(path), image_size=32, batch_size=4, text_encoder=enc, shuffle=False, epochs=1)))
    assert b["key"] == ["tiny", "big", "gray", "pal"]
    assert tuple(b["image"].shape) == (4, 3, 32, 32) and tuple(b["text"].shape) == (4, 32)
    assert torch.isfinite(b["text"]).all()
    assert torch.allclose(b["image"][0, 0], torch.ones(32, 32)) and float(b["image"][0, 1].max()) == 0.0


_STANDIN = """
import pathlib, signal, sys, time
if sys.argv[1]:
    import ray._raylet
    ray._raylet.setproctitle(sys.argv[1])
def bye(*_):
    pathlib.Path(sys.argv[2]).write_text("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
pathlib.Path(sys.argv[2] + ".ready").write_text("")
time.sleep(120)
"""


def test_preempt_sigterms_the_drivers_and_ray_train_workers_and_nothing_else(tmp_path):
    """`sdn-dist preempt`, a Ray pod's preStop hook (k8s/base/rayjob.yaml): Kubernetes' SIGTERM
    reaches only `ray start`, so the hook sends it to the run's processes themselves: a process
    titled as Ray titles a Ray Train worker, and a `sdn_dist train` driver get SIGTERM; a
    `sdn_dist eval` and a shell whose command line holds `sdn-dist train` do not; the hook returns
    once both are gone. Stand-in processes (real ones,
    with those command lines and titles); only they are looked at (``among``), never this machine's
    other runs. Fails on: the worker title or the driver command not matched, any other sdn_dist
    command or a shell matched, the hook not waiting."""
    from sdn_dist.training.preemption import preempt_local
    kinds = {"worker": ["ray::RayTrainWorker"], "driver": ["", "sdn_dist", "-v", "train", "--quiet"],
             "other": ["", "sdn_dist", "eval", "train"]}
    procs = {}
    try:
        for kind, argv in kinds.items():
            path = tmp_path / kind
            procs[kind] = subprocess.Popen([sys.executable, "-c", _STANDIN, argv[0], str(path), *argv[1:]])
        # Ray's job supervisor runs an entrypoint under `sh -c`: the shell is not the driver
        procs["shell"] = subprocess.Popen(["/bin/sh", "-c", "sleep 120", "sdn-dist", "train"])   # $0, $1
        deadline = time.time() + 60
        while not all((tmp_path / f"{k}.ready").exists() for k in kinds) and time.time() < deadline:
            time.sleep(0.1)
        r = preempt_local(30, poll=0.1, among=[p.pid for p in procs.values()])
        assert (r["drivers"], r["workers"], r["left"]) == (1, 1, 0), r
        assert procs["worker"].poll() == 0 and procs["driver"].poll() == 0       # gone by the time it returned
        assert (tmp_path / "worker").read_text() == (tmp_path / "driver").read_text() == "TERM"
        assert procs["other"].poll() is None and not (tmp_path / "other").exists()
        assert procs["shell"].poll() is None
    finally:
        for p in procs.values():
            p.kill()
