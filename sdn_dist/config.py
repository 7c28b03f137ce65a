"""One typed config tree: defaults -> preset -> YAML file -> dotted ``--set key=value`` overrides.

    from sdn_dist.config import load_config
    cfg = load_config(preset="debug", file=None, overrides=["stage1.steps=10"])

Each layer merges into the one below it, mapping by mapping (a file's ``stage2: {lr: 1e-3}`` or
``stage1.point_weights: {image: 5}`` keeps the other keys below it, as ``--set`` does); any other
value replaces. Every field is documented where it is declared (``sdn-dist config show --docs`` prints them).
Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key, before anything
starts. Each component receives its own section (``cfg.model``, ``cfg.data`` ...), never the tree.
"""

from __future__ import annotations

import copy
import typing
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdn_dist.errors import ConfigError


# Default per-sample bounds of the readers (DataConfig.max_caption_chars / max_image_pixels), also
# what the reading pipeline applies when called without a config (eval, teacher training).
MAX_CAPTION_CHARS = 1000
MAX_IMAGE_PIXELS = 4096 * 4096


class Section(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str | list[str] = Field("", description="Training shard URL(s): directory, glob, brace pattern or list; local, file://, http(s)://, s3://.")
    test: str | list[str] = Field("", description="Test shard URL(s), used by sampling grids, eval and the demo.")
    batch_size: int = Field(16, ge=1, description="Global batch (samples per optimizer step over all workers); must divide by workers x deepspeed.grad_accum.")
    readers: int = Field(1, ge=1, description="Ray reader actors per training worker (decode runs there, overlapping training).")
    prefetch: int = Field(4, ge=1, description="Decoded micro-batches each worker keeps in flight.")
    reader_chunk: int = Field(8, ge=1, description="Micro-batches a reader returns per call: Ray's per-call cost (task, pickling, object-store put) was most of a reader's CPU, paid once per chunk. A worker holds or awaits up to max(prefetch, readers x this) + this - 1 micro-batches. 8 measured against 1 and 4 on the demo preset's 64-px micro-batches of 8 on 2 cores (docs/performance.md).")
    shuffle: bool = Field(True, description="Shuffle shard order (per epoch, seeded) and samples within a shard buffer.")
    shuffle_buffer: int = Field(64, ge=1, description="Samples kept in the within-shard shuffle buffer.")
    keep_in_memory: bool = Field(False, description="Keep every sample read (its tar members) in memory, so later epochs do not read the shards again (the same samples in the same order). For data sets that fit (the demo's 4,000 images at 64 px: ~40 MB per reader) and are read many times; see docs/performance.md.")
    cache_bytes: int = Field(1 << 30, ge=0, description="Decoded samples (image, captions, stored caption rows) each shard reader keeps, first come, up to this many bytes, so later epochs do not decode them again; the same batches. 0 = off. A node holds up to readers x ranks x this. Measured on the synthetic demo's shards (docs/performance.md).")
    caption: Literal["random", "first"] = Field("random", description="Which of a sample's captions to use: a seeded random one per epoch, or always the first.")
    strict: bool = Field(False, description="Fail on the first bad sample instead of skipping and counting it.")
    # Bounds on what one sample may cost a reader (docs/reliability.md, "Bounded memory").
    max_caption_chars: int = Field(MAX_CAPTION_CHARS, ge=1, description="Each caption is cut to this many characters before it is tokenised (MiniLM reads 256 tokens, about 1000 characters, anyway), which bounds a reader's memory and the text cache on hostile 100 KB captions.")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="Images with more pixels than this (after JPEG draft-mode downscaling) are skipped as 'image_too_large' without being decoded; bounds a reader's decode memory (Pillow alone refuses only above 179 Mpx).")
    connect_timeout: float = Field(10.0, gt=0, description="http(s) shards: seconds to wait for the server to accept a connection, per attempt.")
    read_timeout: float = Field(60.0, gt=0, description="http(s) shards: seconds to wait for any bytes (the response headers included) before giving up on the attempt.")
    retries: int = Field(5, ge=0, description="Remote shards (http(s), s3, ...): retries of an open after a connect or read timeout, a refused or dropped connection or an unreachable endpoint, waiting 1, 2, 4 ... s between attempts (5: 31 s, longer than the 20 s S3 outage of the chaos run). Also the s3:// bucket check of a run that resumes (a new run's is told at once).")


class TextConfig(Section):
    encoder: Literal["minilm", "hash", "precomputed"] = Field("minilm", description="minilm: packaged all-MiniLM-L6-v2 (384-d, offline); hash: deterministic, dependency-free (tests); precomputed: the shard's KEY.emb.npy rows.")
    path: str = Field("", description="Local path of a sentence-transformers model for encoder=minilm (empty: the packaged one).")
    dim: int = Field(384, ge=1, description="Embedding dimension (hash: chosen; minilm: 384; precomputed: checked against the shards, e.g. 1024 for char-CNN-RNN).")


class ModelConfig(Section):
    image_size: int = Field(224, ge=32, description="Image side in pixels (multiple of 32: VGG19 halves it five times).")
    width: float = Field(1.0, gt=0, le=1, description="Channel-width multiplier on VGG19 (1.0 = 64..512 channels, the paper).")
    fc_dim: int = Field(0, ge=0, description="Width of the student's fc7/fc6 layers (0: 4096 x width).")
    noise_dim: int = Field(0, ge=0, description="Extension, off by default: a noise vector of this size is concatenated to the text embedding.")
    distill_fc7: bool = Field(False, description="Extension, off by default: also distil the teacher's fc7 (needs classifier weights).")
    pool: Literal["avg", "max"] = Field("avg", description="Teacher pooling: the method uses average pooling in place of VGG's max pooling.")
    init: Literal["reference", "kaiming"] = Field("reference", description="Student init: reference = N(0, 0.02) convs / N(0, 0.1) FCs as in the released code; kaiming = He init.")
    negative_slope: float = Field(0.0, ge=0, lt=1, description="Extension, off by default: the student's activations are leaky ReLUs with this slope below zero (0 = ReLU, the paper), so a unit that is off where an object lies still gets a gradient. Tuned on the synthetic benchmark only (the synth recipe: 0.1; docs/results.md).")
    output: Literal["linear", "sigmoid"] = Field("linear", description="Extension, off by default: the student's image layer is linear (the paper; pixels are clamped to [0, 1] when written) or a sigmoid of the same conv, so pixels live in (0, 1) and flat regions stay flat. Tuned on the synthetic benchmark only (the synth recipe: sigmoid; docs/results.md).")
    text_norm: Literal["none", "standardize"] = Field("none", description="Extension, off by default, on in the demo preset: standardize = centre the caption embedding on the training captions' mean and divide by their standard deviation (one number), so the student's first layer sees inputs of the scale its init assumes; the statistics come from the first 1024 training captions and live in the student's weights. Measured on the synthetic benchmark (docs/results.md); the mechanism depends only on the text encoder.")

    @model_validator(mode="after")
    def _check(self):
        if self.image_size % 32:
            raise ValueError(f"model.image_size must be a multiple of 32, got {self.image_size}")
        return self


class TeacherTrainConfig(Section):
    steps: int = Field(600, ge=1, description="Optimizer steps of `sdn-dist teacher train`.")
    lr: float = Field(1e-3, gt=0, description="Peak Adam learning rate for teacher training (linear warm-up over 5 % of the steps, cosine decay to 0).")
    batch_size: int = Field(32, ge=1, description="Batch size for teacher training.")
    processes: int = Field(1, ge=1, description="Data-parallel processes of `sdn-dist teacher train` on this machine (gloo over 127.0.0.1), each with its share of the threads; the same steps and batches as one process, the weights equal to float rounding. On 2 CPU cores two 1-thread processes beat one 2-thread process (docs/performance.md).")
    heads: Literal["spatial", "pooled"] = Field("spatial", description="Input of the attribute heads: pool5 flattened (spatial: where and what colour is linearly readable) or averaged over height and width (pooled).")
    objective: Literal["auto", "labels", "caption"] = Field("auto", description="What the teacher learns: labels = one classifier head per label the shards carry (teacher.train.labels); caption = the image predicts its caption's embedding (text.encoder; cosine distance), for caption-only shards such as img2dataset's; auto = labels when the shards carry any, else caption.")
    colour_heads: float = Field(0.0, ge=0, description="Weight of an auxiliary teacher loss (0 = off): a linear 1x1 read-out at every matched point after the image must predict the image's RGB averaged to that resolution (MSE), so every level keeps the colours it sees; dropped after training. Tuned on the synthetic benchmark only (the synth recipe: 1.0; docs/results.md).")
    level_heads: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict, description="{label name: weight} of an auxiliary teacher loss (empty = off): a linear classifier on the channel means of every matched point must predict the label, so the middle levels carry it too; dropped after training. Any label the shards carry. Tuned on the synthetic benchmark only (the synth recipe: {colour: 1.0}; docs/results.md).")
    labels: list[str] = Field(default_factory=list, description="Label names the teacher classifies, one head each; empty = every label the shards carry (meta 'attributes' entries and 'label'). A name the shards lack is an error that lists the ones they have. The synth recipe names the benchmark's five attributes.")
    rescale: bool = Field(True, description="After training, rescale each conv so every channel's mean activation on training images is 1 (Gatys et al. 2016; the function is unchanged), so that no level dominates SDN's sums of per-point L1 distances.")


class TeacherConfig(Section):
    weights: str = Field("", description="URL (any fsspec URL, https included) of torchvision's ImageNet VGG19 state dict (vgg19-dcbb9e9d.pth) or of a `sdn-dist teacher train` output; `random` = a random-init teacher, the ablation. Empty is allowed only in the debug preset (random); elsewhere `sdn-dist train` stops and says how to get weights.")
    normalize: Literal["auto", "imagenet", "none"] = Field("auto", description="Input normalisation: auto = what the weights file records (ImageNet mean/std for torchvision weights).")
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig, description="Settings of `sdn-dist teacher train`.")


class PlateauConfig(Section):
    patience: int = Field(0, ge=0, description="End stage 1 early after this many logged steps without improvement (0 = off).")
    min_delta: float = Field(0.0, ge=0, description="Improvement below this does not count.")


class StageConfig(Section):
    steps: int = Field(100, ge=0, description="Optimizer steps in this stage.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate: the constant rate, or the peak of the schedule.")
    lr_schedule: Literal["constant", "warmup_cosine"] = Field("constant", description=(
        "Learning rate over this stage: constant (the paper), or warmup_cosine: linear warm-up from 0 to lr over "
        "warmup_steps, then cosine decay to lr * min_lr_ratio at the stage's last step (DeepSpeed's WarmupCosineLR, "
        "so it is saved and resumed with the checkpoint; each stage starts its own)."))
    warmup_steps: int = Field(0, ge=0, description="warmup_cosine: optimizer steps of linear warm-up (DeepSpeed uses at least 2).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="warmup_cosine: final learning rate as a fraction of lr.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW); the paper uses none.")
    loss: Literal["l1", "l2"] = Field("l1", description="Distance per matched point (paper: L1).")
    point_weights: dict[str, float] = Field(default_factory=dict, description="Weight per matched point name (image, conv1_1 .. pool5); missing points weigh 1. Each layer (recipe, YAML file, --set) merges its names into the weights below it; to drop one, set it to 1.")
    tv_weight: float = Field(0.0, ge=0, description="Extension, off by default (the paper): weight of the generated image's total variation (mean absolute difference of neighbouring pixels), added to this stage's loss and logged as point `tv`: an image prior against pixel noise the teacher's features do not see. Tuned on the synthetic benchmark only (the synth recipe: 10; docs/results.md).")


class Stage1Config(StageConfig):
    plateau: PlateauConfig = Field(default_factory=PlateauConfig, description="Early switch rule: stage 1 may end before its steps (stage 2 always runs its steps).")


class DeepSpeedConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision (bf16 is 16-40x slower on CPUs without bf16 units).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps per optimizer step.")
    grad_clip: float = Field(0.0, ge=0, description="Gradient norm clipping (0 = off).")
    # Gradient communication (docs/performance.md, "Where the 2-worker step goes"). ZeRO 0 reduces
    # all gradients in one flattened all-reduce after the backward pass; the bucket and overlap
    # keys act in ZeRO 1/2.
    overlap_comm: bool = Field(False, description="ZeRO 1/2: reduce gradient buckets while the backward pass still runs (DeepSpeed's zero_optimization.overlap_comm). Same fp32 sums, reordered in time (bit-identical weights). Off by default: it only acts in ZeRO 1/2, which measured slower than ZeRO 0 on 2 CPU cores (docs/performance.md); for GPUs, where the reduction runs on its own stream.")
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="ZeRO 1/2: gradient elements per reduction bucket (zero_optimization.reduce_bucket_size). The default keeps the demo's 0.9 M gradients in one bucket: one synchronisation per step.")
    allgather_bucket_size: int = Field(500_000_000, ge=1, description="ZeRO 1/2: parameter elements per all-gather bucket after the partitioned optimizer step (zero_optimization.allgather_bucket_size).")
    contiguous_gradients: bool = Field(True, description="ZeRO 2: copy gradients into one contiguous buffer as they are produced (zero_optimization.contiguous_gradients): no fragmentation, one copy per gradient.")
    comm_dtype: Literal["fp32", "bf16"] = Field("fp32", description="Data type of the gradient all-reduce (DeepSpeed's communication_data_type). bf16 halves the bytes on the wire (the paper preset's 575 MB of fp32 gradients per step) but rounds each gradient to 8 mantissa bits before it is averaged: results differ from fp32. An option for bandwidth-bound multi-node runs, not a default.")
    config: str = Field("", description="Path/URL of a DeepSpeed JSON whose keys override the generated ones.")


class CheckpointConfig(Section):
    every: int = Field(100, ge=1, description="Save every N optimizer steps (and at each stage end).")
    keep: int = Field(2, ge=1, description="Keep the last N checkpoints.")
    background: bool = Field(True, description="Remote `out` (s3:// ...): upload checkpoints in a background thread while training goes on (DeepSpeed writes to local staging first); false = training waits for each upload.")
    upload_retries: int = Field(5, ge=0, le=20, description="Remote `out`: retries of a failed checkpoint upload (an object-store outage) before that checkpoint is given up; earlier checkpoints are never touched.")
    upload_retry_seconds: float = Field(1.0, gt=0, le=600, description="Wait before the first upload retry; doubles each retry (capped at 60 s).")
    upload_timeout_seconds: float = Field(1800.0, gt=0, description="Rank 0 gives up a checkpoint whose other ranks have not all finished uploading within this long.")
    preempt_grace_seconds: float = Field(25.0, gt=0, le=3600, description="After SIGTERM (to the driver or any training worker: Kubernetes eviction, spot reclaim), save a checkpoint at the next step boundary and exit with status 75 (EX_TEMPFAIL) within this many seconds; keep it below the pod's terminationGracePeriodSeconds (30 s by default). Rerunning the same command resumes from that checkpoint.")
    preempt_check_every: int = Field(10, ge=1, description="Steps between the ranks' agreement on whether a SIGTERM came (a collective: every rank must stop at the same step); also at each stage end. The stop comes within this many steps of the signal, so preempt_grace_seconds must cover them plus one checkpoint save (a training worker's SIGTERM at ZeRO 0 stops at the next step instead: a surviving rank checkpoints it alone, docs/reliability.md). 1 = every step (one more all-reduce per step: 2-3 % of a 2-worker CPU step, docs/performance.md).")


class MetricsConfig(Section):
    port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint port (0 = off).")
    host: str = Field("127.0.0.1", description="Bind address of the endpoint (loopback by default; 0.0.0.0 in Kubernetes).")
    log_every: int = Field(10, ge=1, description="Write metrics.jsonl / update gauges every N steps.")
    linger_seconds: float = Field(0.0, ge=0, le=3600, description="After the run, keep serving the final metric values this long so Prometheus scrapes them (at least one scrape interval; 0 = stop at once).")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to <out>/tensorboard/ (losses per point, samples/s, sample grids as images); written locally and uploaded when out is remote.")


class EmaConfig(Section):
    decay: float = Field(0.0, ge=0, lt=1, description="Exponential moving average of the student's weights (0 = off, the paper). When on, the sample grids, the export and so `generate`/`eval` use the averaged student; it is saved and resumed with the checkpoint and restarts from the current weights at the stage switch. E.g. 0.999.")


class SamplesConfig(Section):
    every: int = Field(0, ge=0, description="Write a generated-vs-real PNG grid every N steps (0: only at stage ends).")
    count: int = Field(8, ge=1, description="Test captions in each grid.")


class RayConfig(Section):
    address: str = Field("", description="Ray cluster address; empty = RAY_ADDRESS if set, else an embedded local Ray.")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts from the last checkpoint before the run fails (after a lost worker or node; bad input such as a full disk ends the run at once, exit 2).")
    dashboard: bool = Field(False, description="Start the dashboard with the embedded local Ray (bound to 127.0.0.1).")


class Config(Section):
    preset: str = Field("debug", description="Preset the defaults came from (debug, demo, paper).")
    recipe: str = Field("", description="Recipe applied on the preset (e.g. synth, the synthetic benchmark's tuning; empty = none).")
    out: str = Field("runs/sdn", description="Run directory (any fsspec URL): config, metrics, checkpoints, samples, export.")
    run_id: str = Field("", description="Run id used in metric labels (empty: the run directory's name).")
    workers: int | str = Field(1, description="Data-parallel training workers: an integer (fixed world size) or a range 'MIN-MAX' (elastic: start with as many as the cluster can place, up to MAX; after losing nodes continue from the last checkpoint on no fewer than MIN). data.batch_size stays the global batch at every size.")
    threads_per_worker: int = Field(1, ge=1, description="torch / OMP threads in each worker.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    seed: int = Field(0, description="Seed for init, shuffling and caption choice.")
    autocast: Literal["auto", "off", "bf16"] = Field("off", description="Forward passes under torch.autocast in bfloat16 (weights, optimizer and losses stay fp32). auto: bf16 where the device has bf16 units (AVX512_BF16/AMX, bf16 GPUs), else off; the run logs which. Off by default: faster per step but below the demo's held-out goal at one of two seeds on the synthetic benchmark (docs/results.md, docs/performance.md).")
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: StageConfig = Field(default_factory=StageConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("autocast", mode="before")
    @classmethod
    def _autocast_word(cls, v):
        # YAML 1.1 (PyYAML, so both the config file and --set) reads a bare off / OFF / no as
        # False: the documented default must still work. Case is not significant (OFF, BF16).
        if v is False:
            return "off"
        return v.lower() if isinstance(v, str) else v

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """An integer >= 1, or 'MIN-MAX' with 1 <= MIN <= MAX ('N' and 'N-N' mean the integer N)."""
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(v)) if not isinstance(v, bool) else None
        if m is None:
            raise ValueError(f"workers={v!r}: expected an integer or a range MIN-MAX (e.g. 2 or 1-2)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo < 1 or hi < lo:
            raise ValueError(f"workers={v!r}: need 1 <= MIN <= MAX")
        return lo if lo == hi else f"{lo}-{hi}"

    @model_validator(mode="after")
    def _check(self):
        # The global batch is the same at every world size the run may have (an elastic run
        # re-plans the micro-batch after losing a node): each one must divide it.
        for world in range(self.min_workers, self.max_workers + 1):
            per = world * self.deepspeed.grad_accum
            if self.data.batch_size % per:
                which = "workers" if world == self.workers else f"workers={self.workers} (at {world} workers)"
                raise ValueError(
                    f"data.batch_size={self.data.batch_size} must be divisible by {which} x "
                    f"deepspeed.grad_accum = {world} x {self.deepspeed.grad_accum}")
        if self.ema.decay and self.deepspeed.zero_stage == 3:
            raise ValueError("ema.decay needs whole weights on every rank: use deepspeed.zero_stage 0-2 with it (ZeRO-3 partitions them)")
        return self

    @property
    def min_workers(self) -> int:
        return int(str(self.workers).split("-")[0])

    @property
    def max_workers(self) -> int:
        return int(str(self.workers).split("-")[-1])

    @property
    def micro_batch(self) -> int:
        """Samples per worker per forward/backward at the largest world size."""
        return self.micro_batch_at(self.max_workers)

    def micro_batch_at(self, world_size: int) -> int:
        """Samples per worker per forward/backward with ``world_size`` workers (same global batch)."""
        return self.data.batch_size // (world_size * self.deepspeed.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.stage1.steps + self.stage2.steps


# Presets: YAML files of values over the defaults above, for any image-caption shards
# (sdn_dist/presets/NAME.yaml). debug: seconds on one core (tests). demo: a CPU-sized run, about 15
# minutes of training on 2 cores. paper: the reference at 224 px, for GPUs. A data set's own tuning
# is a recipe (sdn_dist/recipes/), not a preset.
PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS: dict[str, dict[str, Any]] = {
    name: yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    for name in ("debug", "demo", "paper")}


def deep_merge(base: dict, upd: dict) -> dict:
    """``upd`` over ``base``, section by section: a mapping merges key by key into the mapping
    below it (``stageN.point_weights`` too: a file's ``{image: 5}`` keeps the preset's other
    weights, as ``--set stage1.point_weights.image=5`` does); any other value replaces."""
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'stage1.steps=10' -> (['stage1', 'steps'], 10). Values are YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. stage1.steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = nxt
    old = node.get(parts[-1])
    # a mapping merges into the one below, as in a YAML file (deep_merge)
    node[parts[-1]] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


def _check_unknown(tree: Any, model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the full dotted name (pydantic would stop at the first level)."""
    if not isinstance(tree, dict):
        return
    for k, v in tree.items():
        f = model.model_fields.get(k)
        if f is None:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            full = prefix + str(k) + (("." + ".".join(_first_path(v))) if isinstance(v, dict) and v else "")
            raise ConfigError(f"unknown config key '{full}' (valid in {where}: {', '.join(model.model_fields)})")
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_unknown(v, ann, prefix + k + ".")


def _first_path(d: dict) -> list[str]:
    k, v = next(iter(d.items()))
    return [str(k)] + (_first_path(v) if isinstance(v, dict) and v else [])


def _format_validation_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "<config>"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return f"config key '{key}': {msg} (got {e.get('input')!r})"


RECIPES_DIR = Path(__file__).parent / "recipes"


def recipe_names() -> list[str]:
    """The recipes shipped with the package (``sdn_dist/recipes/NAME.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def load_recipe(recipe: str) -> dict[str, Any]:
    """A recipe by name (``synth``: sdn_dist/recipes/synth.yaml) or by path to a YAML file:
    config keys, plus ``preset:`` naming the preset it is meant for."""
    path = Path(recipe)
    if recipe in recipe_names():
        path = RECIPES_DIR / f"{recipe}.yaml"
    elif path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"unknown recipe {recipe!r} (choose from {', '.join(recipe_names())}, "
                          f"or give a .yaml file)")
    return _read_yaml(path, "recipe")


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | None = None, recipe: str | None = None) -> Config:
    """Resolve defaults -> preset -> recipe -> YAML file -> overrides. Raises ConfigError naming
    the key. The preset is the one named explicitly (argument or ``--set preset=``), else the
    file's ``preset:``, else the recipe's, else ``debug``."""
    recipe_tree = load_recipe(recipe) if recipe else {}
    file_tree = _read_yaml(file, "config file") if file else {}
    ov = [parse_override(o) for o in overrides or []]
    for parts, value in ov:
        if parts == ["preset"]:
            preset = value
    preset = preset or file_tree.get("preset") or recipe_tree.get("preset") or "debug"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    tree = PRESETS[preset]
    for layer in (recipe_tree, file_tree):
        tree = deep_merge(tree, {k: v for k, v in layer.items() if k not in ("preset", "recipe")})
    for parts, value in ov:
        _set_dotted(tree, parts, value)
    tree["preset"] = preset
    tree["recipe"] = recipe or ""
    _check_unknown(tree, Config)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def type_name(ann) -> str:
    """A field's type as `config show --docs` prints it: a Literal's values (``l1|l2``), a
    generic with its arguments (``dict[str, float]``), else the type's name."""
    if typing.get_origin(ann) is Literal:
        return "|".join(str(a) for a in typing.get_args(ann))
    if typing.get_args(ann):
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, description) for every leaf, in declaration order."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, prefix + name + ".")
        else:
            tname = type_name(ann)
            rows.append((prefix + name, tname, f.description or ""))
    return rows
