"""One checkpoint holds everything needed to resume: student, optimizer, step, stage, data position, RNG.

Layout under ``<out>/checkpoints/``::

    step-00000120/            DeepSpeed's own files (model states, ZeRO optimizer partitions)
    step-00000120/COMPLETE    written last, by rank 0, after every rank has saved
    step-00000120/client.json  (inside COMPLETE) step, stage, switch step, data position

A directory without ``COMPLETE`` is a checkpoint that was interrupted mid-write: it is never resumed
from and is removed at the next start. Only after a new checkpoint is complete are the oldest beyond
``keep`` deleted, so a failing save (disk full, unwritable ``out``) leaves earlier ones intact.
Remote ``out`` (s3:// ...): DeepSpeed writes to a local staging directory, each rank uploads its own
files, then rank 0 writes the marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from sdn_dist import fsio
from sdn_dist.errors import UserError

_TAG = re.compile(r"^step-(\d{8})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, out: str, keep: int, rank: int = 0):
        self.root = fsio.join(out, "checkpoints")
        self.keep = keep
        self.rank = rank
        self.fs, self.path = fsio.url_to_fs(self.root)
        self.local_root = fsio.local_path(self.root)
        self._staging = None if self.local_root else tempfile.mkdtemp(prefix="sdn-ckpt-")
        self.last_save_seconds = 0.0

    # ------------------------------------------------------------ listing
    def _tags(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return sorted(n for n in names if _TAG.match(n))

    def complete(self) -> list[dict]:
        """Complete checkpoints, oldest first: [{"tag", "step", "stage", ...client state}]."""
        out = []
        for tag in self._tags():
            marker = f"{self.path}/{tag}/COMPLETE"
            if self.fs.exists(marker):
                try:
                    info = json.loads(self.fs.cat_file(marker))
                except (ValueError, OSError):
                    continue  # a marker that does not parse is as good as none
                info["tag"] = tag
                out.append(info)
        return out

    def latest(self) -> dict | None:
        done = self.complete()
        return done[-1] if done else None

    def clean_incomplete(self) -> list[str]:
        """Rank 0, before training starts: remove checkpoints interrupted mid-write."""
        removed = []
        for tag in self._tags():
            if not self.fs.exists(f"{self.path}/{tag}/COMPLETE"):
                self.fs.rm(f"{self.path}/{tag}", recursive=True)
                removed.append(tag)
        return removed

    # ------------------------------------------------------------ save / load
    def save(self, engine, step: int, client_state: dict, tensors: dict | None = None) -> str:
        """Collective: every rank calls it. ``client_state`` is JSON (also written to the marker),
        ``tensors`` holds per-rank RNG state and the like. Returns the tag."""
        t0 = time.time()
        tag = f"step-{step:08d}"
        save_dir = self.local_root or self._staging
        try:
            os.makedirs(save_dir, exist_ok=True)
            engine.save_checkpoint(save_dir, tag=tag, client_state={"sdn": client_state, "sdn_tensors": tensors or {}}, save_latest=False)
            if not self.local_root:
                self.fs.put(os.path.join(save_dir, tag), f"{self.path}/{tag}", recursive=True)
                shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        except (OSError, RuntimeError) as err:
            e = fsio.write_os_error(err, save_dir)   # torch's writer hides ENOSPC in a RuntimeError
            if e is None:
                raise
            # Free what the failed write took (a full disk stays full otherwise); the marker was
            # never written, so nothing will resume from it either way.
            try:
                self.fs.rm(f"{self.path}/{tag}", recursive=True)
            except OSError:
                pass
            raise UserError(f"cannot write checkpoint {self.root}/{tag}: {e.strerror or e} "
                            f"(earlier checkpoints are intact)") from err
        _barrier()
        if self.rank == 0:
            marker = dict(client_state, step=step, time=time.time())
            try:
                fsio.atomic_write(f"{self.root}/{tag}/COMPLETE", json.dumps(marker))
            except UserError as e:
                self.fs.rm(f"{self.path}/{tag}", recursive=True)
                raise UserError(f"{e} (earlier checkpoints are intact)") from e
            self._prune()
        _barrier()
        self.last_save_seconds = time.time() - t0
        return tag

    def _prune(self) -> None:
        done = self.complete()
        for info in done[: max(0, len(done) - self.keep)]:
            self.fs.rm(f"{self.path}/{info['tag']}", recursive=True)

    def load(self, engine, tag: str, module_only: bool) -> dict:
        """Load a complete checkpoint into ``engine``; module_only for a stage switch (fresh optimizer)."""
        load_dir = self.local_root
        if not load_dir:
            load_dir = self._staging
            dst = os.path.join(load_dir, tag)
            shutil.rmtree(dst, ignore_errors=True)
            self.fs.get(f"{self.path}/{tag}", dst, recursive=True)
        verify_safe(os.path.join(load_dir, tag))
        if module_only and engine.zero_optimization_partition_weights():
            _point_latest_at(load_dir, tag)
        path, client = engine.load_checkpoint(
            load_dir, tag=tag, load_module_only=module_only,
            load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only)
        if path is None:
            raise UserError(f"checkpoint {self.root}/{tag} could not be loaded")
        client = client or {}
        return dict(client.get("sdn", {}), tensors=client.get("sdn_tensors", {}))


def _point_latest_at(load_dir: str, tag: str) -> None:
    """DeepSpeed's ZeRO-3 weights-only load (a stage switch) rebuilds the weights with
    ``get_fp32_state_dict_from_zero_checkpoint(load_dir)``, which ignores ``tag`` and reads it from
    ``load_dir/latest`` (deepspeed/runtime/engine.py, ``_load_checkpoint``); checkpoints are saved
    without that file (COMPLETE markers say what is resumable), so name the tag there just before.
    Every rank writes the same content, atomically, so concurrent writers are harmless."""
    tmp = os.path.join(load_dir, f".latest-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(load_dir, "latest"))


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO checkpoints pickle besides tensors and plain data."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_safe(directory: str) -> None:
    """DeepSpeed loads checkpoints without torch's weights-only restriction, which would run any code a hostile
    file carries. Every file is first opened with torch's restricted unpickler (tensors, plain data
    and the allow-listed DeepSpeed classes only); anything else is refused before DeepSpeed sees it."""
    import pickle
    allowed = _deepspeed_safe_globals()
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".pt"):
            continue
        path = os.path.join(directory, name)
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            try:
                allowed_names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
                bad = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed_names]
                why = f"it references {', '.join(bad[:3])}" if bad else type(e).__name__
            except Exception:  # noqa: BLE001 - not even a torch file: say so
                why = "not a readable torch file"
            raise UserError(f"refusing checkpoint file {path}: {why} (only tensors and plain data are loaded)") from None

