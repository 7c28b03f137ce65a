"""Preemption: SIGTERM (Kubernetes eviction, spot reclaim) -> a checkpoint at the next step boundary,
then exit status ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again later"); the same command resumes.

Two ways in, one decision:

- SIGTERM to the driver: ``DriverPreemption`` (installed by ``run_training`` in the main thread,
  after ``ray.init``, which installs its own handler) tells the record collector; every rank holds
  one pending ``until_preempted`` call on it and checks it without blocking at each step.
- SIGTERM to a training worker: the train function runs in Ray Train's ``TrainingThread``, and the
  process's SIGTERM handler belongs to Ray's worker ``main_loop`` (installed after any setup hook;
  ``signal.signal`` works only in the main thread). That handler raises ``SystemExit`` through
  ``ray._private.worker.raise_sys_exit_with_custom_error_message``, and Ray reports the actor dead
  at once, before any ``atexit`` hook could save (measured: Ray Train tore the group down while an
  atexit hook waited). ``WorkerPreemption`` therefore wraps that one function for the life of the
  loop: a SIGTERM raises the local flag instead; once the grace has passed without the loop
  releasing it, the wrapper passes the signal on to Ray's own handling (the process exits as before).
  Ray versions without that function fall back to Ray's default (a restart from the last checkpoint).

The ranks agree on the stop step by a one-element all-reduce (MAX) of their local flags at every
step boundary (``requested``): the same step on every rank, so the checkpoint is a collective like
any other. After it every rank returns normally (no Ray Train retry) and rank 0 reports a
``preempted`` event; the driver maps it to ``EXIT_PREEMPTED``.

A SIGTERMed worker's node is often SIGKILLed seconds later (spot reclaim: 2 s), before the next
agreement step: the agreed checkpoint would need the dead rank. So the SIGTERMed worker also
announces itself at once through the collector (a thread: no Ray call in the signal path), and every
rank looks at the announcement without blocking at each step boundary (``writes_alone``). At ZeRO 0,
where every rank holds the whole student, optimizer and lr scheduler, the lowest rank not announced
checkpoints that step by itself, with no collective (``Checkpointer.save_alone``), reports
``preempted`` and returns: the driver exits 75 and its exit ends the other ranks. At ZeRO >= 1 no
rank holds the whole optimizer state: the agreement above is the only way, and a rank lost before it
leaves the run to resume from the last regular checkpoint. A peer that dies before the survivor
reached a step boundary after the announcement makes the survivor's collective raise instead: it
then writes the last completed step alone (``loop.after_peer_loss``).
"""

from __future__ import annotations

import _thread
import signal
import threading
import time

import ray
import torch
import torch.distributed as dist

try:  # the private function WorkerPreemption wraps (module docstring); a Ray without it: its default
    import ray._private.worker as ray_worker
except ImportError:
    ray_worker = None

EXIT_PREEMPTED = 75   # EX_TEMPFAIL (sysexits.h): a checkpoint was saved; rerun the same command


class WorkerPreemption:
    """One per rank per attempt. ``requested()`` is collective: every rank calls it at the same steps
    (every ``checkpoint.preempt_check_every`` steps and at each stage end)."""

    def __init__(self, collector, grace_seconds: float, rank: int = 0):
        self.grace = grace_seconds
        self.rank = rank
        self._collector = collector
        self._announced: list[int] | None = None   # what until_preempted returned, once it has
        self.local = threading.Event()     # this process got SIGTERM
        self.active = True
        self._owner = threading.current_thread()   # the training loop's thread
        self.since: float | None = None
        self._driver = collector.until_preempted.remote()
        self._flag = torch.zeros(1)
        self._ray_exit = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
        if self._ray_exit is None:   # another Ray: its default (restart from the checkpoint)
            return
        if threading.current_thread() is not threading.main_thread():   # inside a Ray worker process
            ray_worker.raise_sys_exit_with_custom_error_message = self._on_exit_request
        else:
            self._ray_exit = None

    def _on_exit_request(self, message: str, exit_code: int = 0):
        """Runs in the main thread from Ray's SIGTERM handler (and for any other exit Ray asks for)."""
        # Only while the loop lives: after it raised (the thread is gone), Ray's teardown SIGTERM exits.
        if self.active and self._owner.is_alive() and "SIGTERM" in message:
            if not self.local.is_set():
                self.since = time.time()
                self.local.set()
                threading.Thread(target=self._announce, name="sdn-preempt-announce", daemon=True).start()
                timer = threading.Timer(self.grace, self._expire)
                timer.daemon = True
                timer.start()
            return None
        return self._ray_exit(message, exit_code)

    def _announce(self) -> None:
        """Tell every rank now (``writes_alone``), not at the next agreement step."""
        self._collector.preempt.remote(self.rank)

    def _expire(self) -> None:
        if self.active:                       # the grace is over without a checkpoint: exit as Ray would
            self.active = False
            _thread.interrupt_main(signal.SIGTERM)

    def _announced_yet(self, wait_seconds: float = 0.0) -> bool:
        """A preemption was announced (by the driver or any worker); waits up to ``wait_seconds``."""
        if self._announced is None:
            ready, _ = ray.wait([self._driver], timeout=wait_seconds)
            if ready:
                self._announced = ray.get(self._driver)
        return self._announced is not None

    def writes_alone(self, world_size: int, wait_seconds: float = 0.0) -> bool:
        """At a step boundary (non-blocking by default): True on the one rank that is to checkpoint
        this step by itself: training workers announced a preemption (the driver's goes through
        ``requested``) and this is the lowest rank not among them."""
        if not self._announced_yet(wait_seconds) or not self._announced:
            return False
        left = [r for r in range(world_size) if r not in self._announced]
        return bool(left) and left[0] == self.rank

    def requested(self) -> bool:
        """True on every rank when any rank (or the driver) was told to stop."""
        self._flag[0] = float(self.local.is_set() or self._announced_yet())
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return bool(self._flag[0] > 0)

    def close(self) -> None:
        """The loop is done (finished, or saved after a preemption). A SIGTERM from now on takes
        Ray's own path; one that came during the loop leaves the process idle until Ray ends it
        with the job (the driver exits with EXIT_PREEMPTED)."""
        self.active = False
        if self._ray_exit is not None:
            ray_worker.raise_sys_exit_with_custom_error_message = self._ray_exit


class DriverPreemption:
    """The driver's SIGTERM handler (main thread only): records the signal's time; the driver's
    progress loop forwards it to the collector (no Ray calls inside a signal handler)."""

    def __init__(self):
        self.since: float | None = None
        self.forwarded = False
        self._old = None

    def install(self) -> "DriverPreemption":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.since is None:
            self.since = time.time()

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    @property
    def requested(self) -> bool:
        return self.since is not None


# `sdn-dist preempt`: what a pod's preStop hook runs (k8s/base/rayjob.yaml).
WORKER_TITLE = "ray::RayTrainWorker"      # Ray's process title of a Ray Train worker
DRIVER_PROGRAMS = ("sdn-dist", "sdn_dist")     # the console script, `python -m sdn_dist`


def _is_run_process(cmdline: list[str]) -> str | None:
    """"driver", "worker" or None for a process's command line. A driver is a Python process
    running `sdn-dist [options] train` or `python -m sdn_dist train`; not a shell whose command
    line merely holds those words (Ray's job supervisor starts an entrypoint with ``sh -c``: its
    SIGTERM would end the job, not checkpoint it)."""
    if cmdline and cmdline[0].startswith(WORKER_TITLE):
        return "worker"
    if not cmdline or not cmdline[0].rsplit("/", 1)[-1].startswith("python"):
        return None
    args = [a.rsplit("/", 1)[-1] for a in cmdline[1:]]
    for i, a in enumerate(args):
        if a in DRIVER_PROGRAMS:
            rest = [x for x in args[i + 1:] if not x.startswith("-")]
            return "driver" if rest[:1] == ["train"] else None
    return None


def preempt_local(wait_seconds: float, poll: float = 0.5, among: list[int] | None = None) -> dict:
    """Kubernetes' SIGTERM reaches only a container's first process: in a Ray pod that is `ray
    start`, whose exit ends the raylet and with it every worker and driver before any could
    checkpoint (measured: a whole node SIGTERMed at once never wrote a survivor's checkpoint). A
    preStop hook runs first: this sends SIGTERM to this machine's `sdn-dist train` drivers and Ray
    Train worker processes (the two preemption paths above), then waits until they are gone (a
    driver exits 75 after its checkpoint; a preempted worker stays idle until its driver ends the
    job) or ``wait_seconds`` passed; ``among``: only these pids (tests). -> {"drivers": n, "workers": n,
    "left": n, "seconds": s}."""
    import os

    import psutil

    t0 = time.time()
    hit: dict[str, list] = {"driver": [], "worker": []}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] == os.getpid() or (among is not None and p.info["pid"] not in among):
            continue
        kind = _is_run_process(p.info["cmdline"] or [])
        if kind is None:
            continue
        try:
            p.send_signal(signal.SIGTERM)
            hit[kind].append(p)
        except psutil.Error:
            pass
    signalled = hit["driver"] + hit["worker"]
    alive = signalled
    while alive and time.time() - t0 < wait_seconds:
        _, alive = psutil.wait_procs(alive, timeout=poll)
    return {"drivers": len(hit["driver"]), "workers": len(hit["worker"]), "left": len(alive),
            "seconds": round(time.time() - t0, 2)}
