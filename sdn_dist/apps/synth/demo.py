"""`sdn-dist demo`: the whole pipeline on the built-in synthetic benchmark, on an embedded local Ray.

    sdn-dist demo [--out runs/demo-pipeline] [--preset demo|debug] [--set key=value ...]

shards -> teacher -> stage 1 -> stage 2 -> eval -> sample grid. Each part is skipped when its
result is already there ("reusing"), so re-running resumes where an interrupted run stopped
(training resumes from its last checkpoint). ``--preset debug`` runs the same pipeline at toy
size (tiny shards, hash text encoder, a few teacher and training steps) in about a minute: the
end-to-end test uses it.

What lands in ``--out``:

    shards/            synthetic train/test shards (+ synth.json)
    teacher.pt         the VGG19-structured teacher trained on the shards' attribute labels

Settings: the preset (``demo``: sizes and budget for 2 CPU cores) plus the ``synth`` recipe, the
benchmark's own tuning (``sdn-dist config show --recipe synth``).
    run/               the training run (config.yaml, metrics.jsonl, checkpoints/, samples/, export/)
    report.json        the eval report (+ report.txt, report-grid.png: generated over real)
    grid.png           = report-grid.png, the first test captions, generated (top) over real (bottom)
    demo.json          wall time of every part and where everything is
"""

from __future__ import annotations

import json
import os
import shutil
import time

import ray

from sdn_dist import fsio
from sdn_dist.apps.teacher import train_teacher
from sdn_dist.config import load_config
from sdn_dist.apps.synth.dataset import write_synth
from sdn_dist.data.text import build_text_encoder
from sdn_dist.errors import UserError
from sdn_dist.evaluation.report import evaluate, format_report, report_paths
from sdn_dist.training.driver import run_training

# The synthetic benchmark at each preset's size. demo: 4,000 training images, 800 test images
# (half of them held-out attribute combinations), 64 px, MiniLM caption embeddings stored in the
# shards. debug: a toy version for the end-to-end test.
SHARDS = {"train": 4000, "test": 800, "size": 64, "per_shard": 500, "seed": 0}
SHARDS_BY_PRESET = {
    "demo": SHARDS,
    "debug": {"train": 160, "test": 32, "size": 32, "per_shard": 80, "seed": 0},
}
PARTS = 5
# The benchmark's tuning (sdn_dist/recipes/synth.yaml) on top of the preset's sizes.
RECIPE = "synth"


def _step(i: int, title: str) -> float:
    print(f"\n[{i}/{PARTS}] {title}", flush=True)
    return time.time()


def _shard_encoder(cfg):
    """The run's text encoder, using every core while the shards are written (nothing else runs
    then); None for encoders that need nothing stored."""
    if cfg.text.encoder == "precomputed":
        raise UserError("the demo encodes its own captions: text.encoder must be minilm or hash")
    enc = build_text_encoder(cfg.text)
    if hasattr(enc, "threads"):
        enc.threads = max(1, os.cpu_count() or 1)
    return enc


def run_demo(out: str = "runs/demo-pipeline", overrides: list[str] | None = None,
             preset: str = "demo") -> dict:
    if preset not in SHARDS_BY_PRESET:
        raise UserError(f"sdn-dist demo --preset {preset!r}: choose from {', '.join(SHARDS_BY_PRESET)}")
    spec = SHARDS_BY_PRESET[preset]
    out = os.path.abspath(out) if "://" not in out else out
    shards = fsio.join(out, "shards")
    teacher = fsio.join(out, "teacher.pt")
    run = fsio.join(out, "run")
    report = fsio.join(out, "report.json")
    cfg = load_config(preset, recipe=RECIPE, overrides=[
        f"out={run}", f"data.train={shards}/train-*.tar", f"data.test={shards}/test-*.tar",
        f"teacher.weights={teacher}", *(overrides or [])])
    if cfg.model.image_size != spec["size"]:
        raise UserError(f"model.image_size={cfg.model.image_size}: the {preset} demo's shards are "
                        f"{spec['size']} px")
    t_start = time.time()
    times: dict[str, float] = {}
    reused: list[str] = []
    print(f"sdn-dist demo ({preset} preset, {RECIPE} recipe): everything goes to {out}")

    t = _step(1, f"synthetic shards: {spec['train']} train / {spec['test']} test images at "
                 f"{spec['size']} px, captions embedded once ({cfg.text.encoder})")
    if fsio.exists(fsio.join(shards, "synth.json")):
        print("  already there: reusing")
        reused.append("shards")
    else:
        write_synth(out=shards, **spec, embed=_shard_encoder(cfg))
        print(f"  done in {time.time() - t:.0f}s")
    times["shards"] = time.time() - t

    t = _step(2, f"teacher: VGG19 structure trained as an attribute classifier "
                 f"({cfg.teacher.train.steps} steps; no ImageNet weights here)")
    if fsio.exists(teacher):
        print("  already there: reusing")
        reused.append("teacher")
    else:
        res = train_teacher(cfg, shards=f"{shards}/train-*.tar", out=teacher, progress=True)
        print(f"  held-out accuracy {json.dumps(res.get('accuracy', {}))} in {time.time() - t:.0f}s")
    times["teacher"] = time.time() - t

    t = _step(3, f"training: stage 1 ({cfg.stage1.steps} steps) then stage 2 ({cfg.stage2.steps} steps), "
                 f"{cfg.workers} DeepSpeed worker(s) on Ray")
    if fsio.exists(fsio.join(run, "export", "config.json")):
        print("  already trained: reusing")
        reused.append("train")
    else:
        run_training(cfg, progress=True)
        print(f"  done in {time.time() - t:.0f}s")
    if ray.is_initialized():
        # The evaluation needs no Ray: stop the embedded one now rather than at exit, so that its
        # processes leave the cores to the evaluation.
        ray.shutdown()
    times["train"] = time.time() - t

    t = _step(4, "evaluation on the test split (SSIM, FSIM, attribute accuracy by a separate evaluator)")
    if fsio.exists(report):
        print("  already there: reusing")
        reused.append("eval")
        rep = json.loads(fsio.read_text(report))
    else:
        rep = evaluate(run, f"{shards}/test-*.tar", report)
        print(f"  done in {time.time() - t:.0f}s")
    times["eval"] = time.time() - t

    _step(5, "results")
    grid = fsio.join(out, "grid.png")
    src = report_paths(report)["grid"]
    if fsio.local_path(out) and os.path.exists(src) and not os.path.exists(grid):
        shutil.copyfile(src, grid)
    samples = sorted(p for p in os.listdir(os.path.join(run, "samples")) if p.endswith(".png")) \
        if fsio.local_path(run) and os.path.isdir(os.path.join(run, "samples")) else []
    print(f"  report:        {report}")
    print("  " + format_report(rep).rstrip().replace("\n", "\n  "))
    by = rep.get("by_split") or {}
    for kind in ("seen", "heldout", "paraphrase"):
        v = by.get(kind) or {}
        if v.get("attribute_accuracy_mean") is not None and v.get("attribute_accuracy_real_mean"):
            print(f"  {kind:10s} generated/real attribute accuracy: {v['attribute_accuracy_mean']:.3f} / "
                  f"{v['attribute_accuracy_real_mean']:.3f} "
                  f"({v['attribute_accuracy_mean'] / v['attribute_accuracy_real_mean']:.0%} of real)")
    print(f"  sample grid:   {grid} (top: generated from the test captions, bottom: real)")
    if samples:
        print(f"  training grid: {os.path.join(run, 'samples', samples[-1])}")
    example = "a large red circle in the top left on a white background"
    print(f"  try:           sdn-dist generate --checkpoint {run} --text '{example}' --out {out}/generated")
    total = time.time() - t_start
    times["total"] = total
    if fsio.local_path(out):
        # Seconds each part took when it was last actually done (a reused part keeps its time).
        info_url = fsio.join(out, "demo.json")
        try:
            done_before = json.loads(fsio.read_text(info_url)).get("seconds", {}) if fsio.exists(info_url) else {}
        except (ValueError, OSError):
            done_before = {}
        seconds = {k: (done_before.get(k, 0.0) if k in reused else round(v, 1)) for k, v in times.items()
                   if k != "total"}
        info = {"preset": preset, "out": out, "shards": shards, "teacher": teacher, "run": run,
                "report": report, "grid": grid, "reused": reused,
                "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
                "this_invocation_seconds": round(total, 1)}
        fsio.atomic_write(fsio.join(out, "demo.json"), json.dumps(info, indent=2) + "\n")
    print(f"demo finished in {total:.0f}s")
    return rep
