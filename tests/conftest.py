"""Shared fixtures: a real local S3 server (moto's server mode, the S3 HTTP API on 127.0.0.1).

    def test_x(s3):                    # s3.bucket is a fresh, empty bucket
        s3.fs.pipe(f"{s3.bucket}/k", b"v")
        subprocess.run([...], env=s3.env)   # AWS_* set, as a user sets them

The server is one process per test session, started on a free port; every test gets its own
bucket. ``s3.env`` is os.environ plus the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL): what a user exports for an
S3-compatible server, passed unchanged to subprocesses (and from there to Ray workers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import pytest

# scripts/test.sh runs the suite on pytest-xdist workers. Each worker's Ray clusters (embedded ones,
# `ray start` heads, tests/cluster.py) keep their session directories and the ray_current_cluster
# file under a temp dir of its own, so that no worker's cluster is found through another's file.
if os.environ.get("PYTEST_XDIST_WORKER") and "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"   # short: socket paths
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

# The test files that take longest (measured: docs/performance.md, "Start-up, teardown and the
# test suite's time"), handed to the pytest-xdist workers first, so that none of them starts last
# and leaves the other worker idle at the end.
_LONGEST_FIRST = ("tests/test_elastic.py", "tests/test_train.py", "tests/test_chaos.py", "tests/test_bench.py",
                  "tests/test_reliability.py", "tests/test_cluster.py", "tests/test_readme_own_data.py",
                  "tests/test_quality.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh: -n 2 --dist loadfile --no-loadscope-reorder) each test
    file goes whole to one worker (its module fixtures run once), in the order of the items: the
    longest files first, the rest as collected."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {f: i for i, f in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log_path, extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m moto.server` on 127.0.0.1:<free port>; returns (process, endpoint URL)."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("moto server did not start:\n" + open(log_path).read()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def aws_env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict:
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


# endpoint -> the server's log, one line per HTTP request it served ("GET /bucket/key HTTP/1.1")
MOTO_LOGS: dict[str, str] = {}


@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict = field(repr=False)

    def requests(self, since: int = 0) -> tuple[list[str], int]:
        """(the request lines the server logged after byte ``since`` of its log, the log's end):
        what a client really asked of this S3 server."""
        with open(MOTO_LOGS[self.endpoint], "rb") as f:
            f.seek(since)
            data = f.read()
        text = re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", "replace"))   # werkzeug colours some
        return re.findall(r'"[A-Z]+ [^"]* HTTP/[0-9.]+" \d{3}', text), since + len(data)

    @property
    def fs(self):
        """An s3fs filesystem on this server (explicit endpoint: independent of os.environ)."""
        import s3fs
        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, endpoint = start_moto(log)
    MOTO_LOGS[endpoint] = str(log)
    yield endpoint
    stop(proc)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server, with the AWS environment set in this process
    (for in-process fsspec calls) and in ``s3.env`` (for subprocesses)."""
    import s3fs
    env = aws_env(s3_server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()   # a cached filesystem may hold another endpoint
    s = S3(endpoint=s3_server, bucket=f"t-{uuid.uuid4().hex[:12]}", env=dict(os.environ))
    s.fs.mkdir(s.bucket)
    yield s
    s3fs.S3FileSystem.clear_instance_cache()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1:<port> to ``target_port``, to take an S3 server "down"
    (connections refused, open ones cut) and bring it back with its data intact: a real outage
    as a client sees one, for the retry tests."""

    def __init__(self, target_port: int):
        import threading
        self.target = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set = set()
        self._listener = None
        self._resetting = False
        self.up()

    def up(self) -> None:
        import threading
        if self._resetting:
            self._resetting = False
            return
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self, keep_port: bool = False) -> None:
        """Cut every open connection and refuse new ones; ``keep_port``: keep the port bound and
        reset each new connection at once instead (on a busy machine a freed port can be taken by
        another process's outgoing connection before ``up``)."""
        if keep_port:
            self._resetting = True
        else:
            ls, self._listener = self._listener, None
            if ls is not None:
                ls.close()
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, ls) -> None:
        import threading
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return   # closed: down()
            if self._resetting:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()   # an RST: "connection reset by peer"
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:   # close them too: a proxy that only shut them down kept every fd it ever had
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                self._conns.discard(s)


@pytest.fixture(scope="session")
def process_group():
    """One single-process gloo group for the in-process DeepSpeed tests, kept for the whole session:
    DeepSpeed caches its communication backend at the first engine, so a group destroyed by one
    test module and made anew by the next leaves DeepSpeed holding the dead one."""
    import torch.distributed as dist
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture(autouse=True)
def _no_stale_ray_cluster_file():
    """A `ray start --head` (tests/cluster.py, test_cluster, test_job_submit) writes its address to
    /tmp/ray/ray_current_cluster and a SIGTERMed `ray start --block` leaves it: put back what was
    there before the test, so that no later test meets a dead cluster by accident
    (test_a_stale_ray_cluster_file_does_not_stall_the_local_run meets one on purpose)."""
    # where Ray looks (ray._common.utils.get_ray_address_file, without importing ray here)
    path = os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray", "ray_current_cluster")
    before = open(path).read() if os.path.exists(path) else None
    yield
    now = open(path).read() if os.path.exists(path) else None
    if now != before:
        if before is None:
            os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(before)
