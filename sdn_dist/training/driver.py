"""The driver of `sdn-dist train`: run directory, Ray, coordinator, Ray Train workers, progress.

    sdn-dist train --preset debug --set out=runs/x --set data.train=shards/synth

Local by default (an embedded Ray on this machine, bound to 127.0.0.1); the cluster at
``ray.address`` / ``RAY_ADDRESS`` when set, as under ``ray job submit``. The one place that talks
to Ray Train; the per-worker loop is ``trainer.train_worker``.
"""

from __future__ import annotations

import os
import threading
import time

from sdn_dist import fsio
from sdn_dist.config import Config, to_yaml
from sdn_dist.errors import ConfigError, UserError
from sdn_dist.training.failures import stop_on_user_error, user_error_in


def _absolute(url):
    """Workers run in other directories: make local paths absolute, leave URLs alone."""
    if isinstance(url, list):
        return [_absolute(u) for u in url]
    if not url or "://" in url:
        return url
    return os.path.abspath(url)


def resolve_config(cfg: Config) -> Config:
    upd = {"out": _absolute(cfg.out)}
    cfg = cfg.model_copy(update=upd)
    cfg.data.train = _absolute(cfg.data.train)
    cfg.data.test = _absolute(cfg.data.test)
    if cfg.teacher.weights:
        cfg.teacher.weights = _absolute(cfg.teacher.weights)
    if not cfg.run_id:
        cfg.run_id = os.environ.get("SDN_RUN_ID") or cfg.out.rstrip("/").rsplit("/", 1)[-1]
    return cfg


def prepare_run_dir(cfg: Config) -> None:
    fsio.makedirs(cfg.out)
    fsio.atomic_write(fsio.join(cfg.out, "config.yaml"), to_yaml(cfg))


def init_ray(cfg: Config, quiet: bool = True) -> None:
    import ray
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    env = {"OMP_NUM_THREADS": str(cfg.threads_per_worker), "PYTHONUNBUFFERED": "1"}
    show_workers = bool(os.environ.get("SDN_WORKER_LOGS"))
    if address:
        ray.init(address=address, log_to_driver=show_workers or not quiet)
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.workers * cfg.threads_per_worker),
                 include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=show_workers,
                 runtime_env={"env_vars": env}, configure_logging=False)


def _data_spec(cfg: Config) -> tuple[dict, dict, int]:
    """Shard list + counts (read once, tar headers only), text encoder record and dimension."""
    from sdn_dist.data.shards import expand_urls, shard_counts
    from sdn_dist.data.text import build_text_encoder
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give training shards, e.g. --set data.train=shards/synth "
                          "(make some with `sdn-dist shards synth --out shards/synth`)")
    urls = expand_urls(cfg.data.train)
    counts = shard_counts(urls)
    if sum(counts) < cfg.data.batch_size:
        raise UserError(f"data.train={cfg.data.train!r} holds {sum(counts)} samples, fewer than one batch ({cfg.data.batch_size})")
    encoder = build_text_encoder(cfg.text)
    spec = {"urls": urls, "counts": counts, "seed": cfg.seed, "image_size": cfg.model.image_size,
            "data": cfg.data.model_dump(mode="json"), "text": cfg.text.model_dump(mode="json")}
    return spec, encoder.record(), encoder.dim


def _preflight(cfg: Config) -> None:
    """Fail in seconds, before Ray starts, on what would otherwise fail inside every worker:
    teacher weights that do not fit, an output location that cannot be written."""
    from sdn_dist.model.teacher import build_teacher
    build_teacher(cfg.model, cfg.teacher)
    try:
        fsio.makedirs(cfg.out)
        probe = fsio.join(cfg.out, ".write-test")
        fsio.atomic_write(probe, b"ok")
        fs, path = fsio.url_to_fs(probe)
        fs.rm(path)
    except OSError as e:
        raise UserError(f"out={cfg.out} is not writable: {e.strerror or e}") from None


def run_training(cfg: Config, progress: bool = True) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdn_dist.training.coordinator import Coordinator
    from sdn_dist.training.metrics import MetricsSink
    from sdn_dist.training.loop import train_worker

    cfg = resolve_config(cfg)
    data_spec, text_spec, text_dim = _data_spec(cfg)
    _preflight(cfg)
    prepare_run_dir(cfg)
    # Each invocation is an attempt (a rerun after a crash, a Kubernetes retry): it labels metrics and
    # events and names Ray Train's own run state, so retries never overwrite each other's.
    attempt = os.environ.get("SDN_ATTEMPT") or time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    init_ray(cfg, quiet=progress)
    sink = MetricsSink(cfg.out, cfg.metrics, cfg.run_id, attempt)
    coord = Coordinator.remote(cfg.stage1.steps, cfg.stage1.plateau.patience, cfg.stage1.plateau.min_delta)

    storage = fsio.local_path(fsio.join(cfg.out, "ray")) or os.path.abspath(".sdn-ray")
    trainer = TorchTrainer(
        stop_on_user_error(train_worker),
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "coordinator": coord, "data_spec": data_spec,
                           "text_spec": text_spec, "text_dim": text_dim, "attempt": attempt},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        run_config=RunConfig(name=f"{cfg.run_id}-{attempt}", storage_path=storage,
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
    bar = _progress(cfg, progress)
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            _drain(coord, sink, bar, cfg.stage2.steps)
        _drain(coord, sink, bar, cfg.stage2.steps)
    finally:
        if bar is not None:
            bar.close()
        sink.close()
    if "error" in outcome:
        err = outcome["error"]
        cause = _user_error_in(err)
        if cause is not None:
            raise cause
        raise err
    return {"out": cfg.out, "run_id": cfg.run_id}


def _user_error_in(err: BaseException) -> UserError | None:
    """A UserError raised inside a worker arrives wrapped by Ray: unwrap it for exit status 2."""
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


def _progress(cfg: Config, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.total_steps, desc="stage 1", unit="step", dynamic_ncols=True)


def _drain(coord, sink, bar, stage2_steps: int) -> None:
    import ray
    records, status = ray.get(coord.drain.remote())
    fatal = user_error_in(records)   # a worker's bad-input error: never retried (training/failures.py)
    try:
        sink.log(records + [{"event": "message", "text": ev, "time": time.time()} for ev in status["events"]])
    except UserError:
        if fatal is None:
            raise
    if fatal is not None:
        raise fatal
    if bar is None:
        for ev in status["events"]:
            print(ev, flush=True)
        return
    for ev in status["events"]:
        bar.write(ev)
    bar.total = status["switch_step"] + stage2_steps  # the plateau rule can move the switch
    main = [r for r in records if r.get("rank") == 0 and "loss" in r]
    if main:
        r = main[-1]
        bar.set_description(f"stage {r['stage']}")
        bar.set_postfix(loss=f"{r['loss']:.4f}", sps=f"{r['samples_per_sec']:.0f}")
        bar.update(max(0, r["step"] - bar.n))
