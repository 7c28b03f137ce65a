"""`sdn-dist`: the one entry point, the same on a laptop, under `ray job submit` and in a RayJob.

    sdn-dist --help

Exit status: 0 done; 2 bad usage / config / input (one line `error: ...` naming the culprit);
1 any other failure, with its cause.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from sdn_dist.errors import UserError, error_line

# Each command imports what it needs inside its function, on purpose: torch, Ray and DeepSpeed take
# seconds to import, and `sdn-dist --help`, `config show` or a bad-usage error should not wait for them
# (commands that take a config parse it before their heavy import, so a bad key is told at once too).


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (after the preset, before --set)")
    p.add_argument("--preset", default=None, help="debug | demo | paper (default: the file's or the recipe's preset, else debug)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE.yaml",
                   help="a data set's tuned settings on top of the preset, e.g. synth (the synthetic benchmark)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable, e.g. --set stage1.steps=100")


def _config(args):
    from sdn_dist.config import load_config
    return load_config(preset=args.preset, file=args.config, overrides=args.overrides, recipe=args.recipe)


# ---------------------------------------------------------------- commands

def cmd_config_show(args) -> int:
    from sdn_dist.config import describe, to_yaml
    if args.docs:
        for key, typ, doc in describe():
            print(f"{key:32s} {typ:24s} {doc}")
        return 0
    print(to_yaml(_config(args)), end="")
    return 0


def cmd_train(args) -> int:
    cfg = _config(args)
    from sdn_dist.training.driver import run_training
    result = run_training(cfg, progress=not args.quiet)
    print(f"run directory: {result['out']}")
    if result.get("summary"):
        from sdn_dist.training.recovery import format_summary
        print(format_summary(result["summary"]))
    if result.get("preempted") is not None:   # SIGTERM: checkpoint saved, rerun to resume (75)
        step = result["preempted"]
        print(f"preempted{f' at step {step}' if step >= 0 else ''}: rerun the same command to resume",
              file=sys.stderr, flush=True)
    if result.get("fit_running"):
        exit_leaving_ray(result.get("exit_status", 0))
    return result.get("exit_status", 0)


def exit_leaving_ray(status: int) -> None:
    """Exit with ``status`` now, without Ray's at-exit shutdown. After a preemption Ray Train's
    ``fit()`` can still be blocked in the driver's other thread (the controller restarting a group
    without a preempted node); Ray's shutdown under it crashed the interpreter after every event
    was written (SIGSEGV: exit -11, not 75; 1 in 6 two-node runs). The cluster ends this job's
    actors when its driver goes; an embedded Ray's processes die with the driver (Ray starts them
    with the kernel's parent-death signal)."""
    import logging
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(status)


def cmd_model(args) -> int:
    cfg = _config(args)
    from sdn_dist.apps.model_table import format_table, model_table
    table = model_table(cfg)
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


def cmd_teacher_train(args) -> int:
    cfg = _config(args)
    from sdn_dist.apps.teacher import train_teacher
    res = train_teacher(cfg, shards=args.shards, out=args.out, progress=True)
    print(json.dumps(res, indent=2))
    return 0


def _embedder(name: str | None):
    """--embed NAME: store caption embeddings of this encoder in the shards (KEY.emb.npy)."""
    if not name or name == "none":
        return None
    from sdn_dist.config import TextConfig
    from sdn_dist.data.text import build_text_encoder
    return build_text_encoder(TextConfig(encoder=name, dim=384 if name == "minilm" else 32))


def cmd_shards_synth(args) -> int:
    from sdn_dist.apps.synth.dataset import write_synth
    res = write_synth(out=args.out, train=args.train, test=args.test, size=args.size,
                      per_shard=args.per_shard, seed=args.seed, embed=_embedder(args.embed))
    print(json.dumps(res, indent=2) if isinstance(res, (dict, list)) else f"wrote shards to {args.out}")
    return 0


def cmd_shards_convert_folder(args) -> int:
    from sdn_dist.data.convert import convert_folder
    res = convert_folder(images=args.images, captions=args.captions, out=args.out,
                         test_fraction=args.test_fraction, per_shard=args.per_shard, seed=args.seed,
                         embed=_embedder(args.embed))
    print(json.dumps(res, indent=2) if isinstance(res, (dict, list)) else f"wrote shards to {args.out}")
    return 0


def cmd_shards_convert_stackgan(args) -> int:
    from sdn_dist.data.convert import convert_stackgan
    res = convert_stackgan(kind=args.kind, root=args.root, out=args.out, images=args.images,
                           per_shard=args.per_shard, seed=args.seed, embeddings=not args.no_embeddings)
    print(json.dumps(res, indent=2) if isinstance(res, (dict, list)) else f"wrote shards to {args.out}")
    return 0


def cmd_shards_inspect(args) -> int:
    from sdn_dist.data.shards import format_inspection, inspect_shards
    info = inspect_shards(args.url, scan=args.scan)
    if info["counts_from"].get("tars") and info["count_seconds"] >= 1:
        print(f"counting from the tars took {info['count_seconds']:.1f} s; "
              f"`sdn-dist shards index {args.url}` writes an index that skips it", file=sys.stderr)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_shards_index(args) -> int:
    from sdn_dist.data.index import index_shards
    res = index_shards(args.url)
    print(json.dumps(res, indent=2) if args.json else
          f"indexed {res['shards']} shards ({res['samples']} samples; counts from "
          + ", ".join(f"{k}: {v}" for k, v in sorted(res["from"].items()))
          + f") in {res['seconds']:.1f} s: " + ", ".join(res["indexes"]))
    return 0


def cmd_generate(args) -> int:
    from sdn_dist.evaluation.generate import generate
    captions = list(args.text or [])
    for i, c in enumerate(captions):
        if not c.strip():   # an empty caption would silently become an image of nothing in particular
            which = f"--text number {i + 1}" if len(captions) > 1 else "--text"
            raise UserError(f"{which} is an empty caption ({c!r}); give the text to draw")
    if args.text_file:
        try:
            raw = Path(args.text_file).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read --text-file {args.text_file}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise UserError(f"--text-file {args.text_file} is not UTF-8: byte offset {e.start} "
                            f"(line {line}) is {raw[e.start:e.start + 1]!r}") from None
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():   # one caption a line: a blank line would shift every later file name
                raise UserError(f"{args.text_file}:{n}: empty caption (one caption a line; remove the blank line)")
        captions += [l.strip() for l in lines]
    if not captions:
        raise UserError("no captions: give --text and/or --text-file")
    paths = generate(args.checkpoint, captions, args.out, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from sdn_dist.evaluation.report import evaluate, format_report
    report = evaluate(args.checkpoint, args.shards, args.out, limit=args.limit,
                      evaluator=args.evaluator, inception_weights=args.inception_weights,
                      evaluator_steps=args.evaluator_steps, grid=args.grid, batch_size=args.batch_size)
    print(format_report(report), end="")
    print(f"report: {args.out}")
    return 0


def cmd_demo(args) -> int:
    from sdn_dist.apps.synth.demo import run_demo
    run_demo(out=args.out, overrides=args.overrides, preset=args.preset)
    return 0


def cmd_preempt(args) -> int:
    from sdn_dist.training.preemption import preempt_local
    r = preempt_local(args.wait)
    print(f"SIGTERM sent to {r['drivers']} sdn-dist driver(s) and {r['workers']} Ray Train worker(s); "
          + (f"all gone after {r['seconds']:g} s" if not r["left"] else f"{r['left']} still running after {r['seconds']:g} s"))
    return 0


def cmd_bench(args) -> int:
    from sdn_dist.apps.bench.bench import run_bench
    run_bench(out=args.out, quick=args.quick, autocast=args.autocast)
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdn-dist", description="Distributed Symmetrical Distillation Networks (text-to-image) on Ray + DeepSpeed.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__import__('sdn_dist').__version__}")
    ap.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG", default="INFO",
                    help="debug lines of the sdn_dist log too (before the command: sdn-dist -v train ...)")
    ap.add_argument("-q", "--quiet-log", dest="log_level", action="store_const", const="WARNING",
                    help="warnings and errors only (progress lines and notes off)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="whole pipeline on the built-in synthetic benchmark (embedded local Ray)")
    p.add_argument("--out", default="runs/demo-pipeline", help="demo directory (re-running reuses finished parts)")
    p.add_argument("--preset", default="demo", choices=["demo", "debug"],
                   help="demo: the real thing (13-15 min on 2 cores); debug: toy sizes, about a minute (tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override on the preset, e.g. --set stage1.steps=500")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("shards", help="make, convert and inspect WebDataset shards")
    ss = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    q = ss.add_parser("synth", help="write the synthetic coloured-shapes benchmark")
    q.add_argument("--out", required=True)
    q.add_argument("--train", type=int, default=4000, help="training samples")
    q.add_argument("--test", type=int, default=800, help="test samples")
    q.add_argument("--size", type=int, default=64, help="image side in pixels")
    q.add_argument("--per-shard", type=int, default=500, help="samples per tar")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--embed", choices=["none", "minilm", "hash"], default="none",
                   help="also store each caption's embedding (KEY.emb.npy) so training need not encode text")
    q.set_defaults(fn=cmd_shards_synth)
    q = ss.add_parser("convert", help="convert an existing data set to shards")
    cs = q.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    r = cs.add_parser("folder", help="image folder + JSON-lines captions")
    r.add_argument("--images", required=True)
    r.add_argument("--captions", required=True, metavar="FILE.jsonl")
    r.add_argument("--out", required=True)
    r.add_argument("--test-fraction", type=float, default=0.1)
    r.add_argument("--per-shard", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--embed", choices=["none", "minilm", "hash"], default="none",
                   help="also store each caption's embedding (KEY.emb.npy)")
    r.set_defaults(fn=cmd_shards_convert_folder)
    for kind in ("cub", "flowers"):
        r = cs.add_parser(kind, help=f"StackGAN-layout {'CUB-200-2011' if kind == 'cub' else 'Oxford-102'} (reads its Python-2 pickles)")
        r.add_argument("--root", required=True, help="StackGAN data dir (train/, test/, text_c10/)")
        r.add_argument("--images", default=None, help="image directory (default: the first of ROOT/CUB_200_2011/images, "
                                                      "ROOT/images, ROOT/jpg that exists)")
        r.add_argument("--out", required=True)
        r.add_argument("--per-shard", type=int, default=1000)
        r.add_argument("--seed", type=int, default=0)
        r.add_argument("--no-embeddings", action="store_true",
                       help="ignore char-CNN-RNN-embeddings.pickle (no KEY.emb.npy)")
        r.set_defaults(fn=cmd_shards_convert_stackgan, kind=kind)
    q = ss.add_parser("inspect", help="sample count, keys, example caption")
    q.add_argument("url")
    q.add_argument("--json", action="store_true")
    q.add_argument("--scan", action="store_true", help="read every tar (each checked whole, every member "
                                                       "counted) instead of taking counts from the shard index")
    q.set_defaults(fn=cmd_shards_inspect)
    q = ss.add_parser("index", help="write shardindex.json (per-shard sample counts) beside shards "
                                    "made elsewhere, so training starts without reading them")
    q.add_argument("url", help="shards: a directory, glob or brace pattern, local or remote")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_shards_index)

    p = sub.add_parser("teacher", help="the discriminative teacher")
    ts = p.add_subparsers(dest="teacher_command", required=True, metavar="SUBCOMMAND")
    q = ts.add_parser("train", help="train a VGG19-structured teacher on the shards' labels")
    q.add_argument("--shards", required=True, help="training shard URL")
    q.add_argument("--out", required=True, help="output weights file (any fsspec URL)")
    _add_config_args(q)
    q.set_defaults(fn=cmd_teacher_train)

    p = sub.add_parser("model", help="teacher/student layer table")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_model)

    p = sub.add_parser("config", help="show the resolved config")
    cs2 = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    q = cs2.add_parser("show", help="print the resolved config as YAML (or every key's documentation)")
    _add_config_args(q)
    q.add_argument("--docs", action="store_true", help="list every key with its type and meaning")
    q.set_defaults(fn=cmd_config_show)

    p = sub.add_parser("train", help="the distributed two-stage training run",
                       description="Runs on an embedded local Ray, or the cluster at RAY_ADDRESS. "
                                   "Re-running with the same out resumes. `sdn-dist config show --docs` lists every key.")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="captions -> PNGs")
    p.add_argument("--checkpoint", required=True, help="export folder (RUN/export) or run directory; local or any fsspec URL")
    p.add_argument("--text", action="append", help="a caption (repeatable)")
    p.add_argument("--text-file", help="one caption per line")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seeds the noise input of models trained with model.noise_dim > 0")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval", help="quality report (SSIM, FSIM, attribute accuracy, IS/FID)")
    p.add_argument("--checkpoint", required=True, help="export folder (RUN/export) or run directory; local or any fsspec URL (its model card gets the figures)")
    p.add_argument("--shards", required=True, help="test shard URL")
    p.add_argument("--out", required=True, help="report.json path")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N samples (0 = all)")
    p.add_argument("--evaluator", default=None, metavar="URL",
                   help="attribute evaluator file (default: RUN/evaluator.pt, trained on the run's training shards when missing)")
    p.add_argument("--evaluator-steps", type=int, default=None,
                   help="training steps when the evaluator must be trained (default: ~10 epochs, 60-400)")
    p.add_argument("--inception-weights", default=None, metavar="URL",
                   help="Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-*.pth, or a torchvision state dict): adds the Inception Score and FID")
    p.add_argument("--grid", type=int, default=8, help="samples in the generated-vs-real grid PNG")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("preempt", help="SIGTERM this machine's sdn-dist drivers and Ray Train workers, then wait "
                                       "(a Kubernetes preStop hook: the pod's own SIGTERM reaches only `ray start`)")
    p.add_argument("--wait", type=float, default=25.0, metavar="SECONDS",
                   help="wait at most this long for them to be gone (keep it below the pod's terminationGracePeriodSeconds)")
    p.set_defaults(fn=cmd_preempt)

    p = sub.add_parser("bench", help="the performance benchmark")
    p.add_argument("--quick", action="store_true", help="finish within 10 minutes on 2 cores")
    p.add_argument("--out", required=True, metavar="FILE.json")
    p.add_argument("--autocast", choices=["auto", "off", "bf16"],
                   help="every run and peer at this autocast (default: the config's; `auto` resolves on this CPU)")
    p.set_defaults(fn=cmd_bench)
    return ap


def _setup_logging(level: str = "INFO") -> None:
    """The ``sdn_dist`` log (which shards a directory gave, how long a count took, progress lines
    off a terminal ...) on stderr, one plain line each, at ``level`` (-v DEBUG, -q WARNING); other
    libraries' loggers are left as they are."""
    import logging
    log = logging.getLogger("sdn_dist")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        status = int(args.fn(args) or 0)
        sys.stdout.flush()   # here, not at exit: a reader that has gone (`| head -1`) is handled below
        return status
    except BrokenPipeError:
        # stdout was closed by its reader (`sdn-dist shards inspect --json DIR | head -1`): it has
        # what it wanted. Point stdout at /dev/null so the interpreter's own flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - top level: report the cause, exit 1
        if os.environ.get("SDN_DEBUG"):
            traceback.print_exc()
        else:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            print(f"(set SDN_DEBUG=1 for the traceback; raised at {tb.filename}:{tb.lineno})", file=sys.stderr)
        print(error_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
