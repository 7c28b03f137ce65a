"""The exported student: a folder that `generate`, `eval` and :class:`sdn_dist.Pipeline` read,
loadable without Ray, DeepSpeed or pickle.

    from sdn_dist.training.export import load_student
    student, config = load_student("runs/demo")          # or runs/demo/export, s3://bucket/runs/demo

``<out>/export/`` (the layout of a Hugging Face model folder):

* ``model.safetensors`` — the student's state dict (the averaged weights when ``ema.decay`` is on),
  float32, including the ``text_shift`` / ``text_scale`` buffers of ``model.text_norm=standardize``;
* ``config.json`` — everything needed to rebuild it: ``format``, ``model`` (the run's model
  section), ``text`` (the encoder record: encoder, dim, model/version), ``text_statistics`` (the
  standardisation, a copy of the buffers), ``image_size``, ``step``, ``preset``, ``teacher``,
  ``data``, ``ema_decay``, ``sdn_dist_version``;
* ``README.md`` — the model card (training data, steps, preset, the sample grid ``samples.png``
  when the run wrote one, and the evaluation figures once `sdn-dist eval` has run on it);
* ``samples.png`` — the run's last generated-vs-real grid, when it has one.

Older runs (before the safetensors folder) have ``export/student.pt`` instead (torch, read with
``weights_only=True``); it is still read, with a warning, until sdn-dist 1.0.
"""

from __future__ import annotations

import hashlib
import logging
import json
import sys

import fsspec
import safetensors
import safetensors.torch
import torch

import sdn_dist
from sdn_dist import fsio
from sdn_dist.config import Config, ModelConfig
from sdn_dist.errors import UserError, error_line
from sdn_dist.model.student import Student

log = logging.getLogger(__name__)

FORMAT = "sdn-dist-export/1"
WEIGHTS, CONFIG, CARD, GRID = "model.safetensors", "config.json", "README.md", "samples.png"
LEGACY, LEGACY_FORMAT = "student.pt", "sdn-dist-student/1"
LEGACY_UNTIL = "1.0"
REQUIRED = ("model", "text")     # config.json keys without which nothing can be rebuilt


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def text_statistics(state_dict: dict) -> dict | None:
    """The standardisation the student applies to text embeddings, from its buffers (the weights
    are the truth; config.json repeats it for readers that do not load them)."""
    if "text_shift" not in state_dict:
        return None
    return {"mean": [float(v) for v in state_dict["text_shift"].flatten()],
            "std": float(1.0 / float(state_dict["text_scale"]))}


def param_digest(state_dict: dict) -> str:
    """sha256 over a CPU state dict's keys (sorted) and tensor bytes: the trainer's final event
    (``param_sha256``) and the bench's peers compare weights by it."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].numpy().tobytes())
    return h.hexdigest()


def export_student(cfg: Config, state_dict: dict, text_spec: dict, step: int) -> str:
    """Write ``<cfg.out>/export/`` (weights, config, card, grid). Returns the folder's URL."""
    config = {"format": FORMAT, "sdn_dist_version": sdn_dist.__version__,
              "model": cfg.model.model_dump(mode="json"), "text": dict(text_spec),
              "text_statistics": text_statistics(state_dict), "image_size": cfg.model.image_size,
              "step": step, "preset": cfg.preset, "teacher": cfg.teacher.weights,
              "data": {"train": cfg.data.train, "test": cfg.data.test}, "ema_decay": cfg.ema.decay}
    return write_export(fsio.join(cfg.out, "export"), config, state_dict,
                        grid=fsio.join(cfg.out, "samples", f"step-{step:08d}.png"))


def write_export(folder: str, config: dict, state_dict: dict, grid: str | None = None) -> str:
    """weights, card (with ``grid``, the run's last sample grid, copied when it exists), config."""
    # safetensors refuses views into shared storage: give every tensor its own contiguous copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    fsio.atomic_write(fsio.join(folder, WEIGHTS),
                      safetensors.torch.save(tensors, metadata={"format": "pt", "sdn_dist": FORMAT}))
    has_grid = bool(grid) and fsio.exists(grid)
    if has_grid:
        with fsspec.open(grid, "rb") as f:
            fsio.atomic_write(fsio.join(folder, GRID), f.read())
    fsio.atomic_write(fsio.join(folder, CARD), model_card(config, grid=has_grid))
    # config.json last: a folder with a config.json is a complete export (the weights are there)
    fsio.atomic_write(fsio.join(folder, CONFIG), json.dumps(config, indent=2) + "\n")
    return folder


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _weights_kind(decay) -> str:
    if decay == "unrecorded":
        return "not recorded (an older student.pt export)"
    return f"exponential moving average, decay {_fmt(decay)}" if decay else "the final weights (no EMA)"


def model_card(config: dict, *, grid: bool, report: dict | None = None) -> str:
    """The README.md of an export: what the model is, how to call it, what it was trained on, and
    how well it does (``report``: `sdn-dist eval`'s, when it has run)."""
    m, text, data = config["model"], config["text"], config.get("data") or {}
    train = data.get("train") or "?"
    lines = [
        "---", "library_name: sdn-dist", "pipeline_tag: text-to-image", "tags:",
        "- text-to-image", "- sdn-dist", "- symmetrical-distillation-networks", "---", "",
        "# sdn-dist student", "",
        f"A Symmetrical Distillation Networks student (a VGG19 run backwards): caption -> "
        f"{config['image_size']}x{config['image_size']} RGB image in one forward pass, "
        f"trained with sdn-dist {config.get('sdn_dist_version', '?')}.", "",
        "## Use", "", "```python", "from sdn_dist import Pipeline", "",
        "pipe = Pipeline.from_pretrained(\"path/to/this/folder\")   # or s3://..., https://...",
        "images = pipe([\"a large red circle in the top left on a white background\"], seed=0)",
        "images[0].save(\"out.png\")", "```", "",
        "or `sdn-dist generate --checkpoint path/to/this/folder --text \"...\" --out gen/`.", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| training data | `{train if isinstance(train, str) else ', '.join(train)}` |",
        f"| optimizer steps | {config.get('step')} |",
        f"| preset | `{config.get('preset')}` |",
        f"| teacher | `{config.get('teacher') or 'random (ablation)'}` |",
        f"| text encoder | `{text.get('encoder')}` ({text.get('dim')}-d"
        f"{', ' + str(text['model']) if text.get('model') else ''}) |",
        f"| model | width {m.get('width')}, output `{m.get('output')}`, text_norm `{m.get('text_norm')}`"
        f", noise_dim {m.get('noise_dim')} |",
        f"| weights | {_weights_kind(config.get('ema_decay', 'unrecorded'))} |",
        "",
        "## Evaluation", ""]
    if report is None:
        lines += ["Not evaluated yet: `sdn-dist eval --checkpoint path/to/this/folder --shards TEST` "
                  "adds the figures here.", ""]
    else:
        keys = ("ssim", "fsim", "attribute_accuracy_mean", "attribute_accuracy_real_mean", "inception_score", "fid")
        lines += [f"On `{report.get('shards')}` ({report.get('n_images')} images, step {report.get('step')}; see "
                  f"sdn-dist's docs/evaluation.md for each figure):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(report[k])} |" for k in keys if isinstance(report.get(k), (int, float))]
        lines.append("")
    if grid:
        lines += ["## Samples", "", "Generated (top) and real (bottom) test images at the last step:", "",
                  f"![samples]({GRID})", ""]
    return "\n".join(lines)


def write_card_with_report(folder: str, config: dict, report: dict) -> str | None:
    """`sdn-dist eval` rewrites the card of the export it evaluated with its figures. Returns the
    card's URL, or None (with a warning) where the folder cannot be written (e.g. https://)."""
    url = fsio.join(folder, CARD)
    try:
        fsio.atomic_write(url, model_card(config, grid=fsio.exists(fsio.join(folder, GRID)), report=report))
    except Exception as e:  # noqa: BLE001 - a read-only location keeps its card; the report is written anyway
        log.warning(f"warning: could not update the model card {url}: {type(e).__name__}: {e}")
        return None
    return url


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def resolve(checkpoint: str) -> str:
    """A run directory, an export folder or a file in one -> the export folder's URL, or the
    legacy ``student.pt`` file's URL (its folder has no config.json)."""
    url = checkpoint.rstrip("/")
    if url.endswith(".pt"):
        return url
    name = url.rsplit("/", 1)[-1]
    if name in (WEIGHTS, CONFIG, CARD):
        url = url.rsplit("/", 1)[0] if "/" in url else "."
    for folder in (url, fsio.join(url, "export")):
        if fsio.exists(fsio.join(folder, CONFIG)):
            return folder
    if fsio.exists(fsio.join(url, "export", LEGACY)):
        return fsio.join(url, "export", LEGACY)
    if fsio.exists(fsio.join(url, WEIGHTS)):
        return url            # weights without a config: load_student names the missing file
    return fsio.join(url, "export") if name != "export" else url


def read_config(folder: str) -> dict:
    """config.json of an export folder, checked: UserError naming the file and key."""
    url = fsio.join(folder, CONFIG)
    if not fsio.exists(url):
        if fsio.exists(fsio.join(folder, WEIGHTS)):
            raise UserError(f"{url}: missing; an exported model needs its config.json beside {WEIGHTS}")
        raise UserError(f"no exported model at {folder} (no {CONFIG} or {LEGACY}; is the run finished? "
                        f"`sdn-dist train` writes export/ at the end)")
    try:
        config = json.loads(fsio.read_text(url))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{url}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"{url}: format is {got!r}, expected {FORMAT!r}")
    for key in REQUIRED:
        if not isinstance(config.get(key), dict):
            raise UserError(f"{url}: key {key!r} is missing or not an object")
    if "dim" not in config["text"]:
        raise UserError(f"{url}: key 'text.dim' is missing")
    return config


def read_weights(url: str) -> dict[str, torch.Tensor]:
    """model.safetensors from any fsspec URL (read whole: remote files need not seek)."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{url}: file not found") from None
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError: truncated, not safetensors
        raise UserError(f"{url}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None


def check_weights(url: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Names the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shape = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing:
        raise UserError(f"{url}: tensor {missing[0]!r} is missing ({len(missing)} missing) for the model in {CONFIG}")
    if extra:
        raise UserError(f"{url}: unexpected tensor {extra[0]!r} ({len(extra)} not in the model of {CONFIG})")
    if shape:
        k = shape[0]
        raise UserError(f"{url}: tensor {k!r} has shape {list(got[k].shape)}, the model in {CONFIG} "
                        f"needs {list(expected[k].shape)}")


def _load_legacy(url: str, device) -> tuple[Student, dict]:
    log.warning(f"warning: {url} is an older export (a torch file, student.pt); it is read until sdn-dist "
                f"{LEGACY_UNTIL}. Rerun the export with `python -m sdn_dist.training.export {url}` to get the "
                "safetensors folder")
    blob = fsio.load_torch(url, "exported student", map_location="cpu")
    if not isinstance(blob, dict) or blob.get("format") != LEGACY_FORMAT:
        raise UserError(f"{url} is not an sdn-dist exported student (format {LEGACY_FORMAT})")
    model_cfg = ModelConfig.model_validate(blob["model"])
    student = Student(model_cfg, int(blob["text"]["dim"]))
    check_weights(url, student.state_dict(), blob["state_dict"])
    student.load_state_dict(blob["state_dict"])
    config = {k: v for k, v in blob.items() if k != "state_dict"}
    config.update(format=FORMAT, image_size=model_cfg.image_size)
    return student.to(device).eval(), config


def load_student(checkpoint: str, device="cpu") -> tuple[Student, dict]:
    """-> (Student in eval mode, the export's config dict). ``checkpoint``: a run directory, its
    export folder (or a file in it), or a legacy ``student.pt``; any fsspec URL. UserError naming
    the file and key for anything that does not fit."""
    url = resolve(checkpoint)
    if url.endswith(".pt"):
        if not fsio.exists(url):
            raise UserError(f"no exported student at {url} (is the run finished? `sdn-dist train` writes it at the end)")
        return _load_legacy(url, device)
    config = read_config(url)
    try:
        model_cfg = ModelConfig.model_validate(config["model"])
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError: name the first bad key
        first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
        key = ".".join(["model", *map(str, first["loc"])])
        raise UserError(f"{fsio.join(url, CONFIG)}: key {key!r}: {first['msg']}") from None
    student = Student(model_cfg, int(config["text"]["dim"]))
    weights_url = fsio.join(url, WEIGHTS)
    weights = read_weights(weights_url)
    check_weights(weights_url, student.state_dict(), weights)
    student.load_state_dict(weights)
    return student.to(device).eval(), config


def convert_legacy(run_or_file: str) -> str:
    """A older ``student.pt`` -> the export folder beside it (same weights). Returns its URL."""
    url = run_or_file if run_or_file.endswith(".pt") else fsio.join(run_or_file.rstrip("/"), "export", LEGACY)
    student, config = _load_legacy(url, "cpu")
    sd = student.state_dict()
    config.update(sdn_dist_version=sdn_dist.__version__, text_statistics=text_statistics(sd))
    folder = url.rsplit("/", 1)[0]
    run = folder.rsplit("/", 1)[0]
    return write_export(folder, config, sd, grid=fsio.join(run, "samples", f"step-{int(config.get('step') or 0):08d}.png"))


if __name__ == "__main__":
    # python -m sdn_dist.training.export RUN_OR_STUDENT_PT   (converts an older export in place)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sdn_dist.training.export RUN_DIR_OR_STUDENT_PT")
    try:
        print(convert_legacy(sys.argv[1]))
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
