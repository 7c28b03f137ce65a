"""Two Ray nodes and object storage, as on a real cluster (slow tier, one test).

A Ray head and a second node started with `ray start --address ...` on this machine (1 CPU each,
resources {"node_a": 1} / {"node_b": 1}), shards and the run directory on a real S3 server
(moto, tests/conftest.py) reached through the standard AWS environment only. `sdn-dist train
workers=2` is submitted to the cluster (RAY_ADDRESS): one training worker per node, each with its
readers on its own node; every file of the run is in the bucket. A rerun with more steps resumes
from S3, then `generate` and `eval` read the run from S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SDN = [sys.executable, "-m", "sdn_dist"]


def _ray_env(base: dict) -> dict:
    # RAY_memory_monitor_refresh_ms=0: Ray's OOM killer judges the whole machine's memory, which
    # on a shared CI machine other jobs fill; it killed this test's workers there (the kernel's
    # OOM killer still guards the machine).
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a SIGTERMed `ray start` stops its node at once
    # instead of draining it for up to 30 s at teardown.
    env = dict(base, PATH=f"{BIN}:{base['PATH']}", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               RAY_memory_monitor_refresh_ms="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    if Path.home().joinpath(".ray", "auth_token").exists():   # Ray 2.60's token auth, as submit.sh does
        env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture
def two_nodes(s3, tmp_path):
    """(GCS address, env, {resource: node_id}); the nodes inherit the AWS environment, as pods do."""
    gcs = free_port()
    env = _ray_env(s3.env)
    procs = []
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        for tries_left in (2, 1, 0):
            # On a loaded machine `ray start --head` now and then gives up ("the raylet failed to
            # start up or the GCS has become overloaded"): a fresh head on a fresh port, as
            # tests/cluster.py does.
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                 '--resources={"node_a": 1}', *common],
                env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(head)
            address = f"127.0.0.1:{gcs}"
            try:
                _wait_nodes(address, env, 1, procs, tmp_path)
                break
            except AssertionError:
                if not tries_left or head.poll() is None:
                    raise
                procs.remove(head)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)
                gcs = free_port()
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address={address}", '--resources={"node_b": 1}', *common],
            env=env, stdout=open(tmp_path / "node_b.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        nodes = _wait_nodes(address, env, 2, procs, tmp_path)
        yield address, env, nodes
    finally:
        for p in reversed(procs):
            # SIGTERM to `ray start` (it stops what it started), then SIGKILL whatever of its
            # process group is left (its raylet, workers; nothing else).
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_nodes(address, env, n, procs, tmp_path, timeout=180) -> dict:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps({r: n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "for r in n['Resources'] if r.startswith('node_')}))" % address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, [f.read_text()[-2000:] for f in tmp_path.glob("*.log")]
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip():
            nodes = json.loads(r.stdout.strip().splitlines()[-1])
            if len(nodes) >= n:
                return nodes
        time.sleep(2)
    raise AssertionError(f"{n} Ray nodes never came up")


def _jsonl(s3, path):
    return [json.loads(l) for l in s3.fs.cat(path).decode().splitlines()]


@pytest.mark.timeout(2400)   # ~5 min on 2 idle cores; a shared, loaded machine needs far more
def test_two_nodes_s3_shards_s3_run_resume_generate_eval(two_nodes, s3, tmp_path):
    from sdn_dist.apps.synth.dataset import make_synth
    address, env, nodes = two_nodes
    assert set(nodes) == {"node_a", "node_b"} and len(set(nodes.values())) == 2
    local = tmp_path / "shards"
    make_synth(out=str(local), train=32, test=8, size=32, per_shard=16, seed=0, progress=False)
    s3.fs.put(str(local) + "/", f"{s3.bucket}/shards/", recursive=True)
    out = s3.url("runs", "two")
    run = f"{s3.bucket}/runs/two"
    work = tmp_path / "cwd"     # the driver's working directory: nothing of the run may land here
    work.mkdir()
    env = dict(env, RAY_ADDRESS=address)

    def train(stage2_steps):
        t0 = time.time()
        r = subprocess.run(SDN + ["train", "--preset", "debug", "--quiet", "--set", "workers=2",
                                  "--set", f"out={out}", "--set", f"data.train={s3.url('shards', 'train-{000000..000001}.tar')}",
                                  "--set", f"data.test={s3.url('shards')}/", "--set", "stage1.steps=4",
                                  "--set", f"stage2.steps={stage2_steps}", "--set", "checkpoint.every=2"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        print(f"train stage2.steps={stage2_steps}: {time.time() - t0:.0f}s, load {open('/proc/loadavg').read().split()[:3]}")

    train(2)
    recs = _jsonl(s3, f"{run}/metrics.jsonl")
    placed = {r["rank"]: r["node_id"] for r in recs}
    assert sorted(placed.values()) == sorted(nodes.values()), (placed, nodes)   # one worker per node
    for r in recs:
        assert r["world_size"] == 2
        assert r["reader_node_ids"] == [r["node_id"]], r   # decoded batches never crossed nodes
    assert s3.fs.exists(f"{run}/checkpoints/step-00000006/COMPLETE")
    for f in ("config.yaml", "events.jsonl", "export/model.safetensors", "export/config.json", "export/README.md", "samples/step-00000006.png"):
        assert s3.fs.exists(f"{run}/{f}"), f
    assert s3.fs.find(f"{run}/ray")                    # Ray Train's own run state is in the bucket too
    assert list(work.iterdir()) == []

    train(4)   # more steps: resumes from the S3 checkpoint
    ev = _jsonl(s3, f"{run}/events.jsonl")
    assert any(e["event"] == "message" and "resumed from step-00000006" in e["text"] for e in ev), ev
    finals = [e for e in ev if e["event"] == "final"]
    assert {e["step"] for e in finals[-2:]} == {8} and finals[-1]["param_sha256"] == finals[-2]["param_sha256"]
    steps = sorted({r["step"] for r in _jsonl(s3, f"{run}/metrics.jsonl")})
    assert steps == list(range(1, 9))                  # no step run twice nor lost across the resume
    ups = [e for e in ev if e["event"] == "checkpoint_upload"]
    assert {e["rank"] for e in ups} == {0, 1} and all(e["ok"] for e in ups)

    gen = tmp_path / "gen"
    r = subprocess.run(SDN + ["generate", "--checkpoint", out, "--text", "a large red circle on a blue background",
                              "--out", str(gen)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in gen.glob("*.png")] == ["0000-a-large-red-circle-on-a-blue-background.png"]
    r = subprocess.run(SDN + ["eval", "--checkpoint", f"{out}/export", "--shards",
                              s3.url("shards", "test-000000.tar"), "--out", str(tmp_path / "report.json")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["n_images"] == 8
