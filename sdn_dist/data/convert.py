"""Converters from common image-caption layouts to caption shards.

    sdn-dist shards convert folder --images DIR --captions FILE.jsonl --out DIR [--test-fraction F]
    sdn-dist shards convert cub --root data/birds --out shards/cub
    sdn-dist shards convert flowers --root data/flowers --out shards/flowers

Samples are written in a seeded random order, so shards mix classes (a shuffle buffer only mixes
neighbours). Images are stored as they are (JPEG/PNG bytes; other formats are re-encoded to PNG).

The StackGAN metadata (``filenames.pickle``, ``class_info.pickle``, ``char-CNN-RNN-embeddings.pickle``)
are Python-2 pickles. :func:`convert_stackgan` is the only place in sdn-dist that unpickles, only
when a user runs it on files they chose, with ``encoding='latin1'`` and an unpickler restricted to
plain containers and numpy arrays (anything else in the file is refused, not executed).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sdn_dist.errors import DataError
from sdn_dist.data.writer import shard_writer

_KEEP_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def _image_bytes(path: Path, where: str) -> tuple[bytes, str]:
    """(bytes, ext) of an image file, verified to decode; re-encoded to PNG unless JPEG/PNG."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{where}: image {path} does not exist") from None
    except OSError as e:
        raise DataError(f"{where}: image {path} cannot be read ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        ext = _KEEP_EXTS.get(path.suffix.lower())
        if ext is None:
            with Image.open(io.BytesIO(data)) as im:
                buf = io.BytesIO()
                im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: image {path} is not a readable image ({type(e).__name__}: {e})") from None
    return data, ext


def _split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = int(round(test_fraction * n))
    return order[n_test:], order[:n_test]


# ----------------------------------------------------------------------------------------------
# Image folder + JSON lines
# ----------------------------------------------------------------------------------------------

def read_caption_lines(captions: str | os.PathLike) -> list[dict]:
    """Parse and check the JSON-lines caption file; DataError names the file and line."""
    path = Path(captions)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"caption file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"caption file {path} cannot be read ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise DataError(f"{where}: missing \"image\" (a path relative to --images)")
        caps = row.get("captions", row.get("caption"))
        if isinstance(caps, str):
            caps = [caps]
        if (not isinstance(caps, list) or not caps
                or not all(isinstance(c, str) and c.strip() for c in caps)):
            raise DataError(f"{where}: needs \"caption\": \"...\" or \"captions\": [\"...\", ...] "
                            "with non-empty text")
        label = row.get("label")
        if isinstance(label, bool) or (label is not None and not isinstance(label, (int, str))):
            raise DataError(f"{where}: \"label\" must be an integer or a string")
        rows.append({"where": where, "row": row,
                     "captions": [" ".join(c.split()) for c in caps], "label": label})
    if not rows:
        raise DataError(f"caption file {path} holds no samples")
    return rows


def _check_inside(root: Path, real_root: Path, rel: str, where: str) -> None:
    """A captions line may only name a file inside --images: no absolute path, no '..', and no
    symlink (of the file or of a directory on its way) that leads out of it. A caption file from
    elsewhere must not make the shards carry a file the user never meant to share."""
    p = Path(rel)
    if p.is_absolute() or p.drive:
        raise DataError(f"{where}: image {rel!r} is an absolute path; give it relative to --images {root}")
    if ".." in p.parts:
        raise DataError(f"{where}: image {rel!r} climbs out of --images {root} ('..' is not allowed)")
    real = (root / p).resolve()
    if not real.is_relative_to(real_root):
        raise DataError(f"{where}: image {rel!r} is a symlink out of --images {root} (it leads to {real})")


def convert_folder(images: str | os.PathLike, captions: str | os.PathLike, out: str, *,
                   test_fraction: float = 0.0, per_shard: int = 1000, seed: int = 0,
                   progress: bool = True, embed=None) -> dict:
    """Image folder + JSON-lines captions -> ``out/train-*.tar`` (+ ``out/test-*.tar``).

    Each line: ``{"image": "rel/path.png", "caption": "..."}`` or ``"captions": [...]``, optional
    ``"label"`` (int, or a string mapped to its index among the sorted distinct strings; the string
    is kept as ``meta["label_name"]``). Other fields are copied into the metadata. A bad line, a
    missing or unreadable image, or a path that leads out of ``images`` (absolute, ``..``, a symlink
    pointing out) raises DataError naming file and line. ``test_fraction`` of the
    samples (seeded) go to the test split. ``embed``: optional TextEncoder whose caption embeddings
    are stored as ``KEY.emb.npy`` (see :func:`~sdn_dist.apps.synth.dataset.make_synth`).
    Returns ``{"train": [urls], "test": [urls], "counts"}``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"--images {root} is not a directory")
    rows = read_caption_lines(captions)
    real_root = root.resolve()
    for r in rows:  # fail on a bad path or a missing image before writing anything
        _check_inside(root, real_root, r["row"]["image"], r["where"])
        if not (root / r["row"]["image"]).is_file():
            raise DataError(f"{r['where']}: image {root / r['row']['image']} does not exist")
    names = sorted({r["label"] for r in rows if isinstance(r["label"], str)})
    if names and any(isinstance(r["label"], int) for r in rows):
        raise DataError(f"{captions}: labels mix integers and strings")
    label_index = {n: i for i, n in enumerate(names)}

    train_idx, test_idx = _split(len(rows), test_fraction, seed)
    result: dict = {"counts": {}}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        with shard_writer(out, split, per_shard, embed=embed) as sink:
            for i in tqdm(idx, desc=f"convert {split}", unit="img", disable=not progress or not idx):
                r = rows[i]
                data, ext = _image_bytes(root / r["row"]["image"], r["where"])
                meta = {k: v for k, v in r["row"].items() if k not in ("image", "caption", "captions", "label")}
                meta.update(source=r["row"]["image"], split=split)
                if isinstance(r["label"], str):
                    meta.update(label=label_index[r["label"]], label_name=r["label"])
                elif r["label"] is not None:
                    meta["label"] = r["label"]
                sink.add(f"{i:09d}", data, ext, r["captions"], meta)
        result[split], result["counts"][split] = sink.urls, sink.count
    return result


# ----------------------------------------------------------------------------------------------
# StackGAN layout (CUB-200-2011, Oxford-102)
# ----------------------------------------------------------------------------------------------

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("__builtin__", "list"), ("__builtin__", "dict"), ("__builtin__", "tuple"), ("__builtin__", "set"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
}


class _StackGANUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def load_stackgan_pickle(path: str | os.PathLike):
    """Load one StackGAN metadata pickle (Python 2, latin1) with the restricted unpickler.

    The only unpickling in sdn-dist: user-invoked, on files the user points at."""
    try:
        with open(path, "rb") as f:
            return _StackGANUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path} is not a readable StackGAN pickle ({type(e).__name__}: {e})") from None


def _default_images_dir(root: Path, kind: str) -> Path:
    cands = ([root / "CUB_200_2011" / "images", root / "images"] if kind == "cub"
             else [root / "jpg", root / "images", root / "102flowers" / "jpg"])
    for c in cands:
        if c.is_dir():
            return c
    raise DataError(f"no image directory under {root} (tried {', '.join(str(c) for c in cands)}); "
                    "pass --images")


def _find(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def convert_stackgan(root: str | os.PathLike, out: str, *, kind: str = "cub",
                     images: str | os.PathLike | None = None, embeddings: bool = True,
                     per_shard: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """StackGAN-layout CUB-200-2011 / Oxford-102 -> ``out/train-*.tar``, ``out/test-*.tar``.

    ``root`` holds ``train/`` and ``test/`` (each with ``filenames.pickle``, optionally
    ``class_info.pickle`` and ``char-CNN-RNN-embeddings.pickle`` N x 10 x 1024) and ``text_c10/``
    (``<class>/<image>.txt``, one caption per line). Images: ``--images`` or the usual place
    (CUB: ``CUB_200_2011/images/<class>/<image>.jpg``; flowers: ``jpg/<image>.jpg``).
    With ``embeddings`` and the pickle present each sample gets ``KEY.emb.npy`` (float32
    [captions, 1024], row i = caption line i). Metadata: ``label`` (class id - 1, 0-based),
    ``class_id`` (as in class_info.pickle), ``class_name``, ``filename``.
    """
    root = Path(root)
    if kind not in ("cub", "flowers"):
        raise DataError(f"kind must be cub or flowers, got {kind!r}")
    if not root.is_dir():
        raise DataError(f"--root {root} is not a directory")
    img_dir = Path(images) if images else _default_images_dir(root, kind)
    if not img_dir.is_dir():
        raise DataError(f"--images {img_dir} is not a directory")
    text_dir = root / "text_c10"
    if not text_dir.is_dir():
        raise DataError(f"{text_dir} (the captions, text_c10/<class>/<image>.txt) does not exist")
    by_name: dict[str, Path] | None = None

    result: dict = {"counts": {}}
    for split in ("train", "test"):
        sdir = root / split
        filenames = load_stackgan_pickle(sdir / "filenames.pickle")
        if not isinstance(filenames, (list, tuple)) or not all(isinstance(f, (str, bytes)) for f in filenames):
            raise DataError(f"{sdir / 'filenames.pickle'}: expected a list of file names")
        filenames = [f.decode("latin1") if isinstance(f, bytes) else f for f in filenames]
        n = len(filenames)
        class_ids = None
        if (sdir / "class_info.pickle").is_file():
            class_ids = [int(c) for c in load_stackgan_pickle(sdir / "class_info.pickle")]
            if len(class_ids) != n:
                raise DataError(f"{sdir / 'class_info.pickle'}: {len(class_ids)} entries for {n} file names")
        emb_all = None
        emb_path = sdir / "char-CNN-RNN-embeddings.pickle"
        if embeddings and emb_path.is_file():
            try:
                emb_all = np.asarray(load_stackgan_pickle(emb_path), dtype=np.float32)
            except ValueError as e:
                raise DataError(f"{emb_path}: not an array of embeddings ({e})") from None
            if emb_all.ndim == 2:
                emb_all = emb_all[:, None, :]
            if emb_all.ndim != 3 or emb_all.shape[0] != n:
                raise DataError(f"{emb_path}: shape {emb_all.shape}, expected ({n}, captions, dim)")

        order = list(range(n))
        random.Random(seed).shuffle(order)
        with shard_writer(out, split, per_shard) as sink:
            for i in tqdm(order, desc=f"{kind} {split}", unit="img", disable=not progress or not n):
                fname = filenames[i].strip("/")
                where = f"{sdir / 'filenames.pickle'} entry {i} ({fname})"
                stem = fname.rsplit("/", 1)[-1]
                img = _find([img_dir / f"{fname}{e}" for e in (".jpg", ".jpeg", ".png")]
                            + [img_dir / f"{stem}{e}" for e in (".jpg", ".jpeg", ".png")])
                if img is None:
                    raise DataError(f"{where}: no image {img_dir / fname}.jpg")
                txt = _find([text_dir / f"{fname}.txt"])
                if txt is None:
                    if by_name is None:  # flowers keys may lack the class folder
                        by_name = {p.stem: p for p in text_dir.glob("*/*.txt")}
                    txt = by_name.get(stem)
                if txt is None:
                    raise DataError(f"{where}: no caption file {text_dir / fname}.txt")
                raw = txt.read_text(encoding="utf-8", errors="replace").replace("\ufffd\ufffd", " ")
                caps = [" ".join(c.split()) for c in raw.splitlines() if c.strip()]
                if not caps:
                    raise DataError(f"{txt}: no caption")
                emb = None
                if emb_all is not None:
                    m = min(len(caps), emb_all.shape[1])
                    caps, emb = caps[:m], emb_all[i, :m]
                data, ext = _image_bytes(img, where)
                class_name = fname.split("/")[0] if "/" in fname else txt.parent.name
                meta = {"source": kind, "split": split, "filename": fname, "class_name": class_name}
                if class_ids is not None:
                    meta.update(class_id=class_ids[i], label=class_ids[i] - 1)
                sink.add(f"{i:07d}", data, ext, caps, meta, emb)
        result[split], result["counts"][split] = sink.urls, sink.count
    return result


def convert_cub(root, out, **kw) -> dict:
    """``sdn-dist shards convert cub``: :func:`convert_stackgan` with kind="cub"."""
    return convert_stackgan(root, out, kind="cub", **kw)


def convert_flowers(root, out, **kw) -> dict:
    """``sdn-dist shards convert flowers``: :func:`convert_stackgan` with kind="flowers"."""
    return convert_stackgan(root, out, kind="flowers", **kw)
