"""A real two-node Ray cluster on this machine, for the node-loss tests.

    with TwoNodeCluster(tmp_path) as c:        # head + a second node, `ray start --address ...`
        subprocess.run([...], env=c.env)       # RAY_ADDRESS + token auth, as a user submits
        c.kill_node2()                         # SIGKILL its raylet and every process under it

Each node is one `ray start --block` process (its own session) with 1 CPU, so a 2-worker group is
placed one per node, and a distinct custom resource (``head_node`` / ``node2``) so placement is
visible in `ray status`. Ray 2.60 enables token authentication: every process here shares one
generated token through RAY_AUTH_MODE=token + RAY_AUTH_TOKEN (~/.ray is never touched). The
head checks node health every second with a 1 s timeout (3 misses = dead) so that a killed node is
noticed in seconds (Ray's default timeout, 10 s a check, took 30 s).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeExited(AssertionError):
    pass


class TwoNodeCluster:
    def __init__(self, tmp: Path, cpus_per_node: int = 1):
        self.tmp = Path(tmp)
        self.cpus = cpus_per_node
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                   # Ray Train's controller (it runs on these nodes) decides a restart's size from a
                   # resource view that can still count a node the GCS has just declared dead; it then
                   # waits this long for the lost workers before it shrinks (default 60 s).
                   RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
                   # a SIGTERMed `ray start` stops its node at once instead of draining it for 30 s
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        env.pop("RAY_ADDRESS", None)
        self._start_env = env
        self.env = dict(env, RAY_ADDRESS=self.address)   # what a submitter exports
        self.head = self.node2 = None

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                 f"--num-cpus={self.cpus}", "--disable-usage-stats",
                                 f"--resources={json.dumps({name: 1})}", *args],
                                env=self._start_env, stdout=open(self.tmp / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "TwoNodeCluster":
        head = ["--head", f"--port={self.port}", "--include-dashboard=false",
                "--system-config=" + json.dumps({"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                               "health_check_failure_threshold": 3})]
        try:
            self.head = self._start_retrying("head_node", head, 1)
            self.node2 = self._start_retrying("node2", [f"--address={self.address}"], 2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_retrying(self, name: str, args: list[str], nodes: int, tries: int = 3) -> subprocess.Popen:
        """`ray start` gives a raylet a fixed 30 s to register (ray/_private/node.py): on a loaded
        machine it can miss that and exit; starting again is what a user does."""
        for i in range(tries):
            proc = self._start(name, args)
            setattr(self, "head" if name == "head_node" else "node2", proc)
            try:
                self.wait_nodes(nodes)
                return proc
            except NodeExited:
                if i == tries - 1:
                    raise
                self._stop(proc)
                if name == "head_node":   # a fresh port: the failed GCS may still hold the old one
                    self.port = free_port()
                    self.address = f"127.0.0.1:{self.port}"
                    self.env["RAY_ADDRESS"] = self.address
                    args = [a if not a.startswith("--port=") else f"--port={self.port}" for a in args]
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=180)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []

    def wait_nodes(self, n: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p, name in ((self.head, "head_node"), (self.node2, "node2")):
                if p is not None and p.poll() is not None:
                    raise NodeExited(f"{name} exited:\n" + (self.tmp / f"{name}.log").read_text()[-3000:])
            if len(self.alive_nodes()) >= n:
                return
            time.sleep(1)
        raise AssertionError(f"the cluster never had {n} nodes:\n" + (self.tmp / "head_node.log").read_text()[-3000:])

    def kill_node2(self) -> int:
        """SIGKILL the second node's `ray start`, its raylet and every process under it (its
        workers and actors): a machine lost at once, nothing gets to clean up."""
        root = psutil.Process(self.node2.pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.node2.wait(timeout=30)
        return len(procs)

    def term_node2(self, grace: float = 2.0) -> int:
        """SIGTERM the second node's `ray start` and every process under it, then SIGKILL whatever
        is left ``grace`` seconds later: a pod deleted with a short termination grace period."""
        root = psutil.Process(self.node2.pid)
        procs = [root, *root.children(recursive=True)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(grace)
        self.node2.wait(timeout=30)
        return len(procs)

    def add_node2(self) -> None:
        """Start the second node again (a new node id, as a replacement pod has) after it was lost."""
        self._start_retrying("node2", [f"--address={self.address}"], 2)

    def __exit__(self, *exc) -> None:
        for p in (self.node2, self.head):
            self._stop(p)

    @staticmethod
    def _stop(p) -> None:
        if p is not None and p.poll() is not None:
            try:   # a `ray start` that gave up may leave its gcs_server / raylet behind in its session
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif p is not None:
            procs = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            os.kill(p.pid, signal.SIGTERM)   # `ray start` stops what it started (no drain: see env)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            for pid in procs:       # workers the raylet started outside the session, if any
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
