"""The driver of `sdn-dist train`: run directory, Ray, record collector, Ray Train workers, progress.

    sdn-dist train --preset debug --set out=runs/x --set data.train=shards/synth

Local by default (an embedded Ray on this machine, bound to 127.0.0.1); the cluster at
``ray.address`` / ``RAY_ADDRESS`` when set, as under ``ray job submit``. The one place that talks
to Ray Train; the per-worker loop is ``loop.train_worker``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time

import ray
from tqdm import tqdm

from sdn_dist import fsio
from sdn_dist.model.teacher import RANDOM_TEACHER
from sdn_dist.config import Config, to_yaml
from sdn_dist.data.readers import DataSpec
from sdn_dist.errors import UserError
from sdn_dist.net import free_port
from sdn_dist.training import preflight, resource_request
from sdn_dist.training.collector import event, start_collector
from sdn_dist.training.failures import reported_user_error, stop_on_user_error
from sdn_dist.training.metrics import MetricsSink
from sdn_dist.training.preemption import EXIT_PREEMPTED, DriverPreemption
from sdn_dist.training.recovery import RunClock

log = logging.getLogger(__name__)


def _absolute(url):
    """Workers run in other directories: make local paths absolute, leave URLs alone."""
    if isinstance(url, list):
        return [_absolute(u) for u in url]
    if not url or "://" in url or url == RANDOM_TEACHER:
        return url
    return os.path.abspath(url)


def resolve_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with local paths made absolute and the run id filled in (never mutates ``cfg``)."""
    upd = {"out": _absolute(cfg.out),
           "data": cfg.data.model_copy(update={"train": _absolute(cfg.data.train), "test": _absolute(cfg.data.test)}),
           "teacher": cfg.teacher.model_copy(update={"weights": _absolute(cfg.teacher.weights)})}
    cfg = cfg.model_copy(update=upd, deep=True)
    if not cfg.run_id:
        cfg.run_id = os.environ.get("SDN_RUN_ID") or cfg.out.rstrip("/").rsplit("/", 1)[-1]
    return cfg


def prepare_run_dir(cfg: Config) -> None:
    fsio.makedirs(cfg.out)
    fsio.atomic_write(fsio.join(cfg.out, "config.yaml"), to_yaml(cfg))


def init_ray(cfg: Config, quiet: bool = True) -> bool:
    """Connect to the cluster at ``ray.address`` / RAY_ADDRESS, or start an embedded one. True when
    this process started (and so owns) its Ray."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    env = {"OMP_NUM_THREADS": str(cfg.threads_per_worker), "PYTHONUNBUFFERED": "1"}
    show_workers = bool(os.environ.get("SDN_WORKER_LOGS"))
    if address:
        ray.init(address=address, log_to_driver=show_workers or not quiet)
        return False
    else:
        # Ray's state API (Ray Train's PlacementGroupCleaner asks it whether the controller lives)
        # finds "the cluster" through RAY_ADDRESS or /tmp/ray/ray_current_cluster, which a `ray
        # start` head that did not shut down cleanly leaves behind: every state call then waited
        # on a dead GCS and each run's teardown on a 12 s timeout. Name this Ray's own API server.
        port = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.max_workers * cfg.threads_per_worker),
                 include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                 _node_ip_address="127.0.0.1", log_to_driver=show_workers,
                 runtime_env={"env_vars": env}, configure_logging=False)
        return True


def run_training(cfg: Config, progress: bool = True) -> dict:
    started = time.time()   # goodput's wall time of this attempt starts here (training/recovery.py)
    cfg = resolve_config(cfg)
    preflight.run(cfg)  # everything knowable, in seconds, before Ray (even its imports) starts
    # Imported here, after the preflight: Ray Train and DeepSpeed (training.loop) add 1-1.5 s of
    # imports to this module's, and bad input should be told at once.
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdn_dist.training.loop import train_worker

    spec = DataSpec.build(cfg.data, cfg.text, cfg.model, cfg.seed)
    prepare_run_dir(cfg)
    # Each invocation is an attempt (a rerun after a crash, a Kubernetes retry): it labels metrics and
    # events and names Ray Train's own run state, so retries never overwrite each other's.
    attempt = os.environ.get("SDN_ATTEMPT") or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    clock = RunClock.from_run_dir(cfg.out, attempt, started)   # before this attempt appends to out
    embedded = init_ray(cfg, quiet=progress)
    sink = MetricsSink(cfg.out, cfg.metrics, cfg.run_id, attempt)
    sink.log([clock.attempt_event()])
    collector = start_collector()

    storage, storage_fs = fsio.arrow_storage(fsio.join(cfg.out, "ray"))   # s3:// too: no node's disk
    trainer = TorchTrainer(
        stop_on_user_error(train_worker),
        train_loop_config={"cfg": cfg, "data": spec, "collector": collector, "attempt": attempt},
        scaling_config=ScalingConfig(num_workers=scaling_workers(cfg), use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        run_config=RunConfig(name=f"{cfg.run_id}-{attempt}", storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.threads_per_worker),
                                                              "SDN_ATTEMPT": attempt}}),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the driver thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    bar = Progress(cfg, progress)
    # After ray.init (it installs its own SIGTERM handler): SIGTERM asks for a checkpoint instead.
    preempt = DriverPreemption().install()
    preempted = None
    train_run = None    # Ray Train's id of the run the current worker group belongs to
    try:
        while preempted is None:
            alive = thread.is_alive()
            thread.join(timeout=0.5)
            try:
                records = _drain(collector, sink, clock)
            except ray.exceptions.RayError:
                time.sleep(0.1)   # a SIGTERM that came with the error: its handler runs first
                if not preempt.requested:
                    raise
                # The SIGTERM reached the run's Ray too (a signal to the whole process group): the
                # collector is gone with it, and whatever the ranks saved is on disk.
                log.warning("preempted: this run's Ray stopped with the signal; a rerun resumes from the "
                            "last complete checkpoint")
                preempted = -1
                break
            train_run = next((r["train_run"] for r in reversed(records)
                              if r.get("event") == "start" and r.get("train_run")), train_run)
            bar.update(records)
            preempted = _watch_preemption(preempt, collector, records, cfg)
            if not alive:
                break
        if preempted is not None:
            _end_after_preemption(thread, preempt, None if embedded else train_run, sink, cfg)
        summary = clock.summary()     # goodput and recoveries, for events.jsonl, Prometheus, the CLI
        sink.log([summary])
    finally:
        preempt.uninstall()
        bar.close()
        sink.close()
    if preempted is not None:
        # Ray Train's fit() may still be blocked in its thread (a worker's preemption, a dead GCS):
        # the CLI then leaves without Ray's at-exit shutdown (cli.exit_leaving_ray).
        return {"out": cfg.out, "run_id": cfg.run_id, "preempted": preempted,
                "exit_status": EXIT_PREEMPTED, "summary": summary, "fit_running": thread.is_alive()}
    if "error" in outcome:
        err = outcome["error"]
        cause = unwrap_user_error(err)
        if cause is not None:
            raise cause
        raise err
    return {"out": cfg.out, "run_id": cfg.run_id, "summary": summary}


def _end_after_preemption(thread: threading.Thread, preempt: DriverPreemption, train_run: str | None,
                          sink: MetricsSink, cfg: Config) -> None:
    """The checkpoint is written; the driver is about to exit 75, which ends this job's actors (a
    worker group Ray Train may be restarting included). After the driver's own SIGTERM the ranks
    return normally: let Ray Train end the run within what is left of the grace. Not after a
    worker's (its node reclaimed): Ray Train would restart the group without it, and the restarted
    group would train on and checkpoint again. A controller still running when the job ends leaves
    its cluster resource request live for 180 s (a rerun with workers=MIN-MAX then gets no worker
    until it expires: training/resource_request.py), so the driver cancels it itself. (An embedded
    Ray ends with the driver, its request too: ``train_run`` is None, and nothing waits on a GCS
    that a SIGTERM to the whole process group may have ended.)"""
    if preempt.since is not None:
        thread.join(timeout=max(1.0, cfg.checkpoint.preempt_grace_seconds - (time.time() - preempt.since)))
    if thread.is_alive() and resource_request.release(train_run):
        sink.log([event("released", train_run=train_run)])


def scaling_workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's num_workers: fixed, or (min, max) for an elastic run (``workers=MIN-MAX``):
    Ray Train V2 starts as many as the cluster can place up to max and, after losing workers,
    restarts the group from the last checkpoint on no fewer than min."""
    return cfg.workers if isinstance(cfg.workers, int) else (cfg.min_workers, cfg.max_workers)


def _watch_preemption(preempt: DriverPreemption, collector, records: list[dict], cfg: Config):
    """None while no preemption is under way; else the preempted event's step (or -1: the grace ran
    out before a checkpoint). A SIGTERM to the driver is forwarded to the ranks through the collector."""
    for r in records:
        if r.get("event") == "preempted":
            return int(r["step"])
    if preempt.requested:
        if not preempt.forwarded:
            collector.preempt.remote()
            preempt.forwarded = True
        if time.time() - preempt.since > cfg.checkpoint.preempt_grace_seconds:
            log.warning(f"preempted: no checkpoint within checkpoint.preempt_grace_seconds="
                        f"{cfg.checkpoint.preempt_grace_seconds:g}; a rerun resumes from the last complete one")
            return -1
    return None


def unwrap_user_error(err: BaseException) -> UserError | None:
    """The UserError inside the exception Ray Train's ``fit()`` raised (a worker's error arrives
    wrapped by Ray, perhaps several times), for exit status 2; None when there is none.
    (``failures.reported_user_error`` finds one that a worker reported in the drained records.)"""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values()) if isinstance(getattr(e, "worker_failures", None), dict) else []
        for attr in ("error", "training_failed_error"):
            stack.append(getattr(e, attr, None) if isinstance(getattr(e, attr, None), BaseException) else None)
    return None


def _drain(collector, sink, clock: RunClock) -> list[dict]:
    records = ray.get(collector.drain.remote())
    records += clock.observe(records)      # "recovered" events, beside the records that date them
    fatal = reported_user_error(records)   # a worker's bad-input error: never retried (training/failures.py)
    try:
        sink.log(records)
    except UserError:
        if fatal is None:
            raise
    if fatal is not None:
        raise fatal
    return records


class Progress:
    """The driver's progress: a tqdm bar on a terminal; elsewhere (``ray job submit``, a RayJob's
    log, a file) no carriage-return updates, but a plain log line about every ``every`` steps
    (twenty a run). Workers' messages are printed either way; nothing at all with ``--quiet``
    but them."""

    def __init__(self, cfg: Config, enabled: bool, tty: bool | None = None):
        self.stage2_steps = cfg.stage2.steps
        self.total = cfg.total_steps
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(total=cfg.total_steps, desc="stage 1", unit="step", dynamic_ncols=True) if enabled and tty else None
        self.every = max(1, cfg.total_steps // 20) if enabled and not tty else 0
        self.last_line = 0

    def update(self, records: list[dict]) -> None:
        for r in records:
            if r.get("event") == "message":
                (self.bar.write if self.bar is not None else functools.partial(print, flush=True))(r["text"])
                if "switch_step" in r:   # the plateau rule moved the switch
                    self.total = r["switch_step"] + self.stage2_steps
                    if self.bar is not None:
                        self.bar.total = self.total
        main = [r for r in records if r.get("rank") == 0 and r.get("event") is None]
        if not main:
            return
        r = main[-1]
        if self.bar is not None:
            self.bar.set_description(f"stage {r['stage']}")
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", sps=f"{r['samples_per_sec']:.0f}")
            self.bar.update(max(0, r["step"] - self.bar.n))
        elif self.every and (r["step"] - self.last_line >= self.every or r["step"] == self.total):
            self.last_line = r["step"]
            log.info("step %d/%d  stage %d  loss %.4f  %.0f samples/s",
                     r["step"], self.total, r["stage"], r["loss"], r["samples_per_sec"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
