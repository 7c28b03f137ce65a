"""The README's `ray job submit` path end to end: a real local Ray head with its dashboard on
127.0.0.1, launchers/submit.sh on the debug preset, SUCCEEDED, both stages in the run directory."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_agent(gcs_address: str, env: dict, timeout: float = 180) -> None:
    """Wait until the head's dashboard agent (which runs submitted jobs) has registered its address
    in the GCS, as Ray's own job tests do (`get_register_agents_number` in
    dashboard/modules/job/tests/test_job_agent.py): until then the dashboard answers but refuses
    submissions with "No available agent to submit job"."""
    script = (
        "import sys\n"
        "from ray._common.test_utils import wait_for_condition\n"
        "from ray._raylet import GcsClient\n"
        "from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX, GCS_RPC_TIMEOUT_SECONDS\n"
        "from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD\n"
        "gcs = GcsClient(address=sys.argv[1])\n"
        "wait_for_condition(lambda: len(gcs.internal_kv_keys(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(),\n"
        "    namespace=KV_NAMESPACE_DASHBOARD, timeout=GCS_RPC_TIMEOUT_SECONDS)) >= 1,\n"
        "    timeout=float(sys.argv[2]), retry_interval_ms=500)\n")
    # In a child process: the GCS client picks up the token-auth settings of the head's environment.
    auth = {"RAY_AUTH_MODE": "token"} if Path.home().joinpath(".ray", "auth_token").exists() else {}
    r = subprocess.run([sys.executable, "-c", script, gcs_address, str(timeout)], env=dict(env, **auth),
                       capture_output=True, text=True, timeout=timeout + 60)
    assert r.returncode == 0, "the head's job agent never registered:\n" + r.stderr[-3000:]


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, agent = free_port(), free_port(), free_port()
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: the SIGTERMed head stops at once instead of
    # draining for up to 30 s at teardown.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # the job agent's HTTP port, which runs submitted jobs: Ray's default 52365 may be held by
         # another Ray on this machine (a test on the other xdist worker), and then no job is taken
         f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(1)
        else:
            raise AssertionError("the Ray dashboard never came up:\n" + (tmp_path / "head.log").read_text()[-3000:])
        wait_for_job_agent(f"127.0.0.1:{gcs}", env)
        yield address, env
    finally:
        # SIGTERM to `ray start` (it stops what it started), then SIGKILL the rest of its group.
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)


def test_ray_job_submit_debug_run(ray_head, tmp_path):
    from sdn_dist.apps.synth.dataset import make_synth
    address, env = ray_head
    shards = tmp_path / "shards"
    make_synth(out=str(shards), train=32, test=8, size=32, per_shard=16, seed=0, progress=False)
    out = tmp_path / "run"
    for _ in range(3):   # the agent is registered (ray_head); a retry is left for a slow first answer
        r = subprocess.run(
            ["bash", "launchers/submit.sh", "--preset", "debug", "--run-id", "e2e", "--attempt", "a1",
             "--out", str(out), "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar",
             "--set", "metrics.port=0"],
            cwd=REPO, env=dict(env, RAY_ADDRESS=address), capture_output=True, text=True, timeout=900)
        # Ray says so when nothing was submitted: trying again is what a user does.
        if "No available agent to submit job" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # as a user checks it, with the same token-auth environment submit.sh uses
    auth = {"RAY_AUTH_MODE": "token"} if Path.home().joinpath(".ray", "auth_token").exists() else {}
    st = subprocess.run([str(BIN / "ray"), "job", "status", "e2e--a1"], env=dict(env, RAY_ADDRESS=address, **auth),
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0 and "Job 'e2e--a1' succeeded" in st.stdout, st.stdout + st.stderr

    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {1, 2}
    assert max(r["step"] for r in recs) == 16
    assert (out / "export" / "model.safetensors").exists()
    assert (out / "checkpoints" / "step-00000016" / "COMPLETE").exists()
    assert all(r["attempt"] == "a1" for r in recs)
