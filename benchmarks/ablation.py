"""The SDN ablation on the synthetic benchmark, with the `demo` preset and equal step budgets.

    python benchmarks/ablation.py --out runs/ablation [--quick] [--from-demo runs/demo-pipeline]

Every variant is a real `sdn-dist train --preset demo` run (2 DeepSpeed workers on an embedded
Ray) followed by `sdn-dist eval` with one shared attribute evaluator, on the same shards and
teacher; only the stage settings below differ. The step budget is the demo preset's
stage1.steps + stage2.steps (--quick: a quarter of it) for every variant:

    a  pixel L1 only   stage 1 with every point weight 0 but `image`, all steps (no teacher signal)
    a2 pixel L1, no TV (a) with stage1.tv_weight 0 (the preset's image prior smooths a lone pixel loss)
    b  stage 1 only    direct distillation, all steps
    c  stage 2 only    indirect distillation through the teacher, all steps, from the random init
    d  SDN             stage 1 then stage 2 (the demo preset's split)
    e  SDN, random     (d) with a random-init teacher (teacher.weights=random)
    f  SDN, captions   (d) with a teacher trained from the captions alone (teacher.train.objective=caption)

Shards and teacher: made here exactly as `sdn-dist demo` makes them (same code, same sizes), or
taken from a finished demo directory with --from-demo (its shards/ and teacher.pt, read only;
its run/ stands for (d), the same training run). Variant (f) trains its own teacher from the
captions alone (teacher-caption.pt).
Re-running reuses every finished run and report. Outputs under --out: one run directory per
variant, `<variant>/report.json`, `table.md` (the table docs/results.md shows), `results.json`,
and `grids/<variant>.png` (first 8 test captions; generated over real).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import yaml

POINTS_BUT_IMAGE = None  # filled from sdn_dist.model.plan.POINTS


def variants(s1: int, s2: int) -> dict[str, dict]:
    from sdn_dist.model.plan import POINTS
    total = s1 + s2
    pixel_only = {p: 0.0 for p in POINTS if p != "image"}
    return {
        "a-pixel-l1": {"label": "(a) pixel L1 only, no teacher",
                       "config": {"stage1": {"steps": total, "point_weights": pixel_only},
                                  "stage2": {"steps": 0}}},
        # The preset's image prior (stageN.tv_weight) weighs far more against a lone pixel loss
        # than against the teacher's features: (a) without it is the fairer pixel baseline.
        "a2-pixel-l1-no-tv": {"label": "(a') pixel L1 only, no teacher, no total variation",
                              "config": {"stage1": {"steps": total, "point_weights": pixel_only, "tv_weight": 0.0},
                                         "stage2": {"steps": 0}}},
        "b-stage1": {"label": "(b) stage 1 only", "config": {"stage1": {"steps": total}, "stage2": {"steps": 0}}},
        "c-stage2": {"label": "(c) stage 2 only", "config": {"stage1": {"steps": 0}, "stage2": {"steps": total}}},
        "d-sdn": {"label": "(d) SDN: stage 1 then stage 2", "config": {"stage1": {"steps": s1}, "stage2": {"steps": s2}}},
        "e-sdn-random-teacher": {"label": "(e) SDN, random-init teacher",
                                 "config": {"stage1": {"steps": s1}, "stage2": {"steps": s2}},
                                 "teacher": "random"},
        "f-sdn-caption-teacher": {"label": "(f) SDN, caption-objective teacher (no labels)",
                                  "config": {"stage1": {"steps": s1}, "stage2": {"steps": s2}},
                                  "teacher": "caption"},
    }


def teacher_of(variant: dict, label_teacher: str, caption_teacher: str | None) -> str:
    """The variant's teacher.weights: the recipe's label teacher, the caption teacher, or random."""
    kind = variant.get("teacher", "labels")
    return {"labels": label_teacher, "caption": caption_teacher, "random": "random"}[kind]


def caption_teacher_file(out: str, shards: str) -> str:
    """The teacher the synth recipe trains, but from the captions alone: objective caption and no
    level heads (they need labels); its colour read-outs need none and stay."""
    from sdn_dist.config import load_config
    from sdn_dist.apps.teacher import train_teacher
    path = os.path.join(out, "teacher-caption.pt")
    if not os.path.exists(path):
        cfg = load_config("demo", recipe="synth", overrides=["teacher.train.objective=caption",
                                                              "teacher.train.level_heads={}"])
        t = time.time()
        res = train_teacher(cfg, shards=f"{shards}/train-*.tar", out=path, progress=True)
        json.dump({**res, "seconds": round(time.time() - t, 1)}, open(path + ".json", "w"), indent=2)
    return path


KINDS = ("seen", "paraphrase", "heldout")
ATTRS = ("background", "colour", "position", "shape", "size")


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def render_table(rows: dict, s1: int, s2: int, demo, quick: bool) -> str:
    """The markdown table docs/results.md shows: generated / real attribute accuracy per split kind
    (the evaluator's mean over the 5 attributes), per attribute on the seen split, SSIM, FSIM."""
    first = next(iter(rows.values()), {})
    lines = [f"Steps per variant: {s1 + s2} ({'quick: ' if quick else ''}demo preset {s1} + {s2}), "
             f"batch {demo.data.batch_size}, {demo.workers} workers. Attribute accuracy of the independent "
             f"evaluator on the generated test images, mean of the 5 attributes (on the real test images: "
             + ", ".join(f"{k} {_f(first.get(k + '_real'))}" for k in KINDS) + ").", "",
             "| variant | seen | paraphrase | held-out | " + " | ".join(f"{a} (seen)" for a in ATTRS)
             + " | colour (held-out) | SSIM | FSIM | train s |",
             "|---|---|---|---|" + "---|" * len(ATTRS) + "---|---|---|---|"]
    for r in rows.values():
        per = r.get("seen_attribute_accuracy") or {}
        held = r.get("heldout_attribute_accuracy") or {}
        lines.append(f"| {r['label']} | " + " | ".join(_f(r.get(k + "_gen")) for k in KINDS) + " | "
                     + " | ".join(_f(per.get(a), ".2f") for a in ATTRS)
                     + f" | {_f(held.get('colour'), '.2f')} | {_f(r['ssim'])} | {_f(r['fsim'])} | {r['train_seconds'] or '-'} |")
    return "\n".join(lines) + "\n"


def sh(cmd: list[str], log: str) -> float:
    """Run a command, output appended to ``log``; raise on failure. Returns wall seconds."""
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)} (see {log})")
    return time.time() - t


def prepare_data(out: str, from_demo: str | None) -> tuple[str, str]:
    """Shards + trained teacher: from a demo directory, or made here as the demo makes them."""
    if from_demo:
        shards, teacher = os.path.join(from_demo, "shards"), os.path.join(from_demo, "teacher.pt")
        for p in (os.path.join(shards, "synth.json"), teacher):
            if not os.path.exists(p):
                raise SystemExit(f"--from-demo {from_demo}: {p} is missing (run `sdn-dist demo --out {from_demo}` first)")
        return shards, teacher
    from sdn_dist.config import load_config
    from sdn_dist.apps.synth.dataset import write_synth
    from sdn_dist.apps.synth.demo import SHARDS, _shard_encoder
    from sdn_dist.apps.teacher import train_teacher
    shards, teacher = os.path.join(out, "shards"), os.path.join(out, "teacher.pt")
    cfg = load_config("demo", recipe="synth")
    if not os.path.exists(os.path.join(shards, "synth.json")):
        write_synth(out=shards, **SHARDS, embed=_shard_encoder(cfg))
    if not os.path.exists(teacher):
        train_teacher(cfg, shards=f"{shards}/train-*.tar", out=teacher, progress=True)
    return shards, teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--quick", action="store_true", help="a quarter of the step budget")
    ap.add_argument("--from-demo", default=None, metavar="DIR", help="reuse a demo directory's shards and teacher")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()

    from sdn_dist.config import load_config
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    log = os.path.join(out, "ablation.log")
    demo = load_config("demo", recipe="synth")
    s1, s2 = demo.stage1.steps, demo.stage2.steps
    if args.quick:
        s1, s2 = s1 // 4, s2 // 4
    shards, teacher = prepare_data(out, args.from_demo)
    test = f"{shards}/test-*.tar"
    exe = [sys.executable, "-m", "sdn_dist.cli"]

    # One evaluator for every variant (trained once on the real training images).
    evaluator = os.path.join(out, "evaluator.pt")
    if not os.path.exists(evaluator):
        from sdn_dist.evaluation.judge import train_evaluator
        train_evaluator(f"{shards}/train-*.tar", demo.model.image_size, evaluator, progress=False)

    chosen = [v for v in args.only.split(",") if v] or None
    caption_teacher = (caption_teacher_file(out, shards) if not chosen or "f-sdn-caption-teacher" in chosen
                       else None)
    rows = {}
    for name, v in variants(s1, s2).items():
        if chosen and name not in chosen:
            continue
        vdir = os.path.join(out, name)
        run = os.path.join(vdir, "run")
        report = os.path.join(vdir, "report.json")
        os.makedirs(vdir, exist_ok=True)
        demo_run = os.path.join(args.from_demo or "", "run")
        if name == "d-sdn" and args.from_demo and not os.path.exists(run) and os.path.isdir(demo_run):
            os.symlink(os.path.abspath(demo_run), run)   # (d) is the demo's own training run
        conf = dict(v["config"], out=run,
                    data={"train": f"{shards}/train-*.tar", "test": test},
                    teacher={"weights": teacher_of(v, teacher, caption_teacher)})
        conf_file = os.path.join(vdir, "variant.yaml")
        with open(conf_file, "w") as f:
            yaml.safe_dump(conf, f, sort_keys=False)
        timing_file = os.path.join(vdir, "timing.json")
        timing = json.load(open(timing_file)) if os.path.exists(timing_file) else {}
        if not os.path.exists(os.path.join(run, "export", "config.json")):
            print(f"[{name}] training ({v['label']})", flush=True)
            timing["train_seconds"] = round(sh(exe + ["train", "--preset", "demo", "--recipe", "synth", "--config", conf_file, "--quiet"], log), 1)
            json.dump(timing, open(timing_file, "w"))
        if not os.path.exists(report):
            print(f"[{name}] evaluating", flush=True)
            sh(exe + ["eval", "--checkpoint", run, "--shards", test, "--out", report,
                      "--evaluator", evaluator], log)
        rep = json.load(open(report))
        grid = os.path.join(vdir, "report-grid.png")
        if os.path.exists(grid):
            shutil.copyfile(grid, os.path.join(out, "grids", f"{name}.png"))
        by = rep.get("by_split", {})
        rows[name] = {"label": v["label"], "train_seconds": timing.get("train_seconds"),
                      "attribute_accuracy": rep.get("attribute_accuracy"),
                      "ssim": rep.get("ssim"), "fsim": rep.get("fsim")}
        for kind in KINDS:
            k = by.get(kind, {})
            rows[name].update({f"{kind}_gen": k.get("attribute_accuracy_mean"),
                               f"{kind}_real": k.get("attribute_accuracy_real_mean"),
                               f"{kind}_attribute_accuracy": k.get("attribute_accuracy")})
        print(f"[{name}] " + "  ".join(f"{kind} {rows[name][kind + '_gen']}" for kind in KINDS)
              + f"  SSIM {rows[name]['ssim']}  FSIM {rows[name]['fsim']}", flush=True)

    table = render_table(rows, s1, s2, demo, args.quick)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"<!-- {' '.join(['python', 'benchmarks/ablation.py'] + sys.argv[1:])} -->\n{table}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"command": ["python", "benchmarks/ablation.py"] + sys.argv[1:], "steps": [s1, s2],
                   "machine": machine, "rows": rows}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
