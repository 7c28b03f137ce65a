"""Everything knowable before Ray starts, checked in seconds: `sdn-dist train` calls :func:`run`.

    from sdn_dist.training import preflight
    preflight.run(cfg)      # UserError (exit 2, one line naming the key / file) or nothing

What would otherwise fail a minute later inside every worker, or never fail at all:

* the config as a whole: every ``stageN.point_weights`` name is one of the matched points of
  ``sdn_dist/model/plan.py``; ``deepspeed.config`` is readable and holds a JSON object;
* the run directory: a rerun into an ``out`` that holds checkpoints of another model (its
  ``config.yaml`` differs in a ``model.*`` key, or in ``text.encoder`` / ``text.dim``, which size
  the student's input) would resume into the wrong shapes, and one whose newest checkpoint an older
  sdn-dist wrote cannot be resumed; either refusal comes before anything is written, so ``out`` is
  left byte for byte as it was; ``out`` must be writable;
* the data: the first sample of the first training shard is read and decoded exactly as the
  readers will (so ``text.encoder=precomputed`` on shards without ``KEY.emb.npy``, or embeddings
  of another ``text.dim``, stop here, naming the shard and the member);
* the teacher weights load into the configured VGG19.

Cheap checks come first. The shard URLs are read with ``data.*`` network timeouts from here on.
"""

from __future__ import annotations

import json

import yaml

from sdn_dist import fsio
from sdn_dist.config import Config
from sdn_dist.data.index import list_ahead
from sdn_dist.data.pipeline import decode_problem
from sdn_dist.data.shards import configure_network, expand_urls
from sdn_dist.data.text import build_text_encoder
from sdn_dist.errors import ConfigError, DataError, UserError
from sdn_dist.model.losses import check_point_weights
from sdn_dist.model.teacher import build_teacher

# Keys of the resolved config that fix the shapes of what a run directory's checkpoints hold.
_TEXT_SHAPE_KEYS = ("encoder", "dim")


def run(cfg: Config) -> None:
    """All checks, cheapest first. Raises UserError naming the offending key, file or value."""
    check_config(cfg)
    resumes = check_run_dir(cfg)
    # A run that resumes has read its shards before: an object store it cannot reach now is more
    # likely down for a while than misnamed, so the bucket check waits (data.retries); a new run is
    # told at once.
    configure_network(cfg.data, patient_buckets=resumes)
    check_data(cfg)
    check_teacher(cfg)
    check_writable(cfg)


def check_config(cfg: Config) -> None:
    """What the typed config cannot check on its own: a teacher chosen (random only by name,
    outside the debug preset), point names and the DeepSpeed JSON."""
    if not cfg.teacher.weights and cfg.preset != "debug":
        raise ConfigError(
            "teacher.weights is empty: SDN needs a trained teacher. Give torchvision's ImageNet VGG19 "
            "(--set teacher.weights=URL of vgg19-dcbb9e9d.pth, any fsspec URL, https included) or "
            "train one on your shards (`sdn-dist teacher train --shards URL --out teacher.pt`, then "
            "--set teacher.weights=teacher.pt); teacher.weights=random is the random-teacher ablation")
    check_point_weights(cfg.stage1, "stage1")
    check_point_weights(cfg.stage2, "stage2")
    url = cfg.deepspeed.config
    if url:
        try:
            text = fsio.read_text(url)
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config={url}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"deepspeed.config={url}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        try:
            conf = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config={url}: not valid JSON ({e.msg} at line {e.lineno} "
                              f"column {e.colno})") from None
        if not isinstance(conf, dict):
            raise ConfigError(f"deepspeed.config={url}: must hold a JSON object of DeepSpeed keys, "
                              f"not a {type(conf).__name__}")
        if cfg.min_workers != cfg.max_workers and cfg.deepspeed.zero_stage and _nvme_optimizer(cfg):
            raise ConfigError(f"workers={cfg.workers} with deepspeed.zero_stage={cfg.deepspeed.zero_stage} and "
                              f"deepspeed.config={url} swapping the optimizer state to NVMe (offload_optimizer): "
                              f"DeepSpeed cannot re-partition it for another number of workers; use a fixed "
                              f"workers count, or no NVMe offload")


def _differences(old: dict, new: dict, prefix: str) -> list[str]:
    return [f"{prefix}{k}" for k in new if old.get(k) != new[k]]


def check_run_dir(cfg: Config) -> bool:
    """A rerun resumes from ``out``'s checkpoints: they must be of the configured model. True when
    there is one to resume from."""
    previous = fsio.join(cfg.out, "config.yaml")
    try:
        if not fsio.exists(previous):
            return False
        # what the Checkpointer would resume from: step-NNNNNNNN directories with COMPLETE
        fs, path = fsio.url_to_fs(fsio.join(cfg.out, "checkpoints"))
        done = sorted(p.rstrip("/").split("/")[-2] for p in fs.glob(f"{path}/step-*/COMPLETE"))
    except OSError:
        return False   # not readable as a run directory: check_writable names the problem
    if not done:
        return False   # nothing to resume: the new run simply starts over
    try:
        old = yaml.safe_load(fsio.read_text(previous)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"out={cfg.out} holds checkpoints but its config.yaml cannot be read "
                        f"({type(e).__name__}); use another out") from None
    new = cfg.model_dump(mode="json")
    old_model, old_text = old.get("model") or {}, old.get("text") or {}
    diff = _differences(old_model, new["model"], "model.")
    diff += _differences(old_text, {k: new["text"][k] for k in _TEXT_SHAPE_KEYS}, "text.")
    if diff:
        key = diff[0]
        section, name = key.split(".", 1)
        was = (old_model if section == "model" else old_text).get(name)
        now = new[section][name]
        raise UserError(
            f"out={cfg.out} holds checkpoints of another model ({done[-1]}): {key}={was!r} "
            f"there, {key}={now!r} now" + (f" (also {', '.join(diff[1:])})" if diff[1:] else "")
            + "; use another out to start a new run, or the run's own settings to resume it")
    # The workers refuse such a checkpoint too (TrainState.load_state_dict), but only after the driver has
    # rewritten config.yaml and started logging into out: a refused resume must leave out as it was.
    try:
        marker = json.loads(fsio.read_text(fsio.join(cfg.out, "checkpoints", done[-1], "COMPLETE")))
    except (OSError, UnicodeDecodeError, ValueError):
        return True   # unreadable marker: the Checkpointer's own listing decides what it resumes
    if isinstance(marker, dict) and "schedule" not in marker:
        raise UserError(f"out={cfg.out}: checkpoint {done[-1]} was written by an older sdn-dist (no train "
                        f"state in its COMPLETE marker): use another out to start a new run, or the "
                        f"release that wrote it to resume it")
    # ZeRO 1-3 state of another world size is converted at the resume (Checkpointer.load,
    # DeepSpeed's universal checkpoint), except where DeepSpeed's universal load skips the
    # optimizer: its state swapped to NVMe (engine.load_checkpoint, DeepSpeed 0.19.8).
    zero, saved_world = (old.get("deepspeed") or {}).get("zero_stage") or 0, marker.get("world_size")
    if zero and isinstance(saved_world, int) and cfg.min_workers == cfg.max_workers != saved_world \
            and _nvme_optimizer(cfg):
        raise UserError(f"out={cfg.out}: checkpoint {done[-1]} holds deepspeed.zero_stage={zero} optimizer "
                        f"state of {saved_world} worker(s), workers={cfg.workers} now, and deepspeed.config="
                        f"{cfg.deepspeed.config} swaps it to NVMe (offload_optimizer), which DeepSpeed cannot "
                        f"re-partition; resume with workers={saved_world}, or use another out")
    return True


def _nvme_optimizer(cfg: Config) -> bool:
    """The user DeepSpeed JSON (check_config has read it) puts the optimizer state on NVMe."""
    if not cfg.deepspeed.config:
        return False
    zero = json.loads(fsio.read_text(cfg.deepspeed.config)).get("zero_optimization") or {}
    return isinstance(zero, dict) and (zero.get("offload_optimizer") or {}).get("device") == "nvme"


def check_data(cfg: Config) -> None:
    """Read and decode the first sample of the first training shard as a reader would."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give training shards, e.g. --set data.train=shards/synth "
                          "(make some with `sdn-dist shards synth --out shards/synth`)")
    list_ahead(cfg.data.train)   # the listing DataSpec.build then reuses (data/index.py)
    url = expand_urls(cfg.data.train, split="train")[0]
    encoder = build_text_encoder(cfg.text)
    problem = decode_problem(url, cfg.data, image_size=cfg.model.image_size, text_encoder=encoder)
    if problem is None:
        return
    key, reason, detail = problem
    if reason == "missing_embedding":
        raise DataError(f"text.encoder=precomputed but shard {url} has no {key}.emb.npy (sample "
                        f"{key}): these shards carry no caption embeddings; use text.encoder=minilm "
                        f"or hash, or shards written with embeddings")
    if reason == "bad_embedding" and encoder.precomputed:
        raise DataError(f"text.encoder=precomputed, text.dim={cfg.text.dim}: shard {url} member "
                        f"{key}.emb.npy does not fit ({detail})")
    if cfg.data.strict:
        raise DataError(f"shard {url} sample {key}: {reason} ({detail}) (data.strict=true)")
    # Otherwise one bad sample is what skipping is for; a whole epoch of them stops the readers.


def check_teacher(cfg: Config) -> None:
    """Teacher weights that do not fit the configured VGG19 (names the file and the key)."""
    build_teacher(cfg.model, cfg.teacher)


def check_writable(cfg: Config) -> None:
    try:
        fsio.makedirs(cfg.out)
        probe = fsio.join(cfg.out, ".write-test")
        fsio.atomic_write(probe, b"ok")
        fs, path = fsio.url_to_fs(probe)
        fs.rm(path)
    except OSError as e:
        raise UserError(f"out={cfg.out} is not writable: {e.strerror or e}") from None
