"""One checkpoint holds everything needed to resume: student, optimizer, step, stage, data position, RNG.

Layout under ``<out>/checkpoints/``::

    step-00000120/            DeepSpeed's own files (model states, ZeRO optimizer partitions)
    step-00000120/COMPLETE    written last, by rank 0, after every rank has saved
    step-00000120/client.json  (inside COMPLETE) step, stage, switch step, data position
    step-00000120/universal/  only after a resume at another world size (ZeRO 1-3): DeepSpeed's
                              universal checkpoint of the files above, made by ``load``

A directory without ``COMPLETE`` is a checkpoint that was interrupted mid-write: it is never resumed
from and is removed at the next start (as is a ``step-N.rank-R`` directory: one rank's checkpoint
written alone, ``save_alone``, that never got renamed to ``step-N``). Only after a new checkpoint is complete are the oldest beyond
``keep`` deleted, so a failing save (disk full, unwritable ``out``) leaves earlier ones intact.

Remote ``out`` (s3:// ...): DeepSpeed writes to a local staging directory (seconds), then each rank
uploads its own files in a background thread while training goes on (``checkpoint.background``),
retrying an object-store outage with exponential backoff. A rank that is done puts
``.rank-NNNNN.done`` beside its files; rank 0, once every rank's marker is there, writes
``COMPLETE`` and only then prunes. A new save (and the stage switch, and the end of the run) first
waits for the previous upload. An upload that still fails after its retries gives that checkpoint
up (no marker; rank 0 removes what was uploaded) and training continues from memory: earlier
checkpoints are never touched. Nothing of a run depends on a node's disk surviving: the staging
copy is deleted once uploaded.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from sdn_dist import fsio
from sdn_dist.config import CheckpointConfig
from sdn_dist.errors import UserError

_TAG = re.compile(r"^step-(\d{8})$")
_ALONE = re.compile(r"^step-(\d{8})\.rank-(\d{5})$")   # save_alone's private directory before its rename


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointUploadError(RuntimeError):
    """A checkpoint that could not be stored (its upload failed after every retry)."""


class Checkpointer:
    def __init__(self, out: str, keep: int, rank: int = 0, world_size: int = 1, cfg: CheckpointConfig | None = None,
                 report: Callable[[list[dict]], object] | None = None,
                 say: Callable[[str], object] | None = None):
        """``cfg``: the ``checkpoint`` config section (defaults if None); ``report(records)`` and
        ``say(text)`` send checkpoint records / messages to the driver (they may be called from
        the upload thread)."""
        self.cfg = cfg or CheckpointConfig(keep=keep)
        self.root = fsio.join(out, "checkpoints")
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.fs, self.path = fsio.url_to_fs(self.root)
        self.local_root = fsio.local_path(self.root)
        self._staging = None if self.local_root else tempfile.mkdtemp(prefix="sdn-ckpt-")
        self.last_save_seconds = 0.0     # how long the last save() held training up
        self._report = report or (lambda records: None)
        self._say = say or (lambda text: None)
        self._pending: _Upload | None = None
        self.failed: list[str] = []      # tags given up after failed uploads

    # ------------------------------------------------------------ listing
    def _tags(self) -> list[str]:
        self.fs.invalidate_cache()   # other ranks and processes write here: never trust a cached listing
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
        self.wait()   # the checkpoint still uploading is the latest one once it is complete
        done = self.complete()
        return done[-1] if done else None

    def clean_incomplete(self) -> list[str]:
        """Rank 0, before training starts: remove checkpoints interrupted mid-write."""
        removed = []
        for tag in self._tags():
            if not self.fs.exists(f"{self.path}/{tag}/COMPLETE"):
                self.fs.rm(f"{self.path}/{tag}", recursive=True)
                removed.append(tag)
        if self.local_root and os.path.isdir(self.local_root):   # save_alone's, killed before its rename
            for name in sorted(os.listdir(self.local_root)):
                if _ALONE.match(name):
                    shutil.rmtree(os.path.join(self.local_root, name), ignore_errors=True)
                    removed.append(name)
        return removed

    # ------------------------------------------------------------ save / load
    def save(self, engine, step: int, states: Mapping[str, object]) -> str:
        """Collective: every rank calls it. DeepSpeed's files hold the engine's student, optimizer
        and lr scheduler; beside them, ``states`` (name -> an object with ``state_dict()`` /
        ``load_state_dict()``, a plain dict, or None for nothing) go into its client state, and the
        ``train`` entry (JSON) is also written to the COMPLETE marker. Returns the tag. With a
        remote ``out`` it returns once DeepSpeed has written the local staging copy; the upload
        goes on behind."""
        saved = _state_dicts(states)
        client_state = saved.get("train", {})
        self.wait()   # one upload at a time: the previous checkpoint is complete (or given up) first
        t0 = time.time()
        tag = f"step-{step:08d}"
        save_dir = self.local_root or self._staging
        try:
            os.makedirs(save_dir, exist_ok=True)
            engine.save_checkpoint(save_dir, tag=tag, client_state={"sdn": saved}, save_latest=False)
        except (OSError, RuntimeError) as err:
            e = fsio.write_os_error(err, save_dir)   # torch's writer hides ENOSPC in a RuntimeError
            if e is None:
                raise
            # Free what the failed write took (a full disk stays full otherwise); the marker was
            # never written, so nothing will resume from it either way.
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
            raise UserError(f"cannot write checkpoint {self.root}/{tag}: {e.strerror or e} "
                            f"(earlier checkpoints are intact)") from err
        if self.local_root:
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
            if self.rank == 0:
                self._done_record(tag, step, client_state, t0, self.last_save_seconds, 0.0)
            return tag
        up = _Upload(self, tag, step, client_state, t0)
        self._pending = up
        if self.cfg.background:
            up.start()
        else:
            up.run()
            self.wait()
        self.last_save_seconds = time.time() - t0
        return tag

    def save_alone(self, engine, step: int, states: Mapping[str, object]) -> str:
        """``save`` by this rank alone, with no collective (a preemption's survivor: the other ranks
        may be dead already). ZeRO 0 only: there every rank holds the whole student, optimizer and
        lr scheduler, the same on every rank after each step, and DeepSpeed's one model-states file
        (the one ``save`` has rank 0 write) is all that ``load`` reads. The files go to a private
        ``step-N.rank-R`` directory first, renamed to ``step-N`` once written; ``COMPLETE`` comes
        last: a rank killed on the way leaves nothing that resume takes. A checkpoint of that step
        that is complete already is kept as it is. Returns the tag."""
        if engine.zero_optimization():
            raise ValueError("a checkpoint by one rank needs ZeRO 0: at ZeRO >= 1 each rank holds a "
                             "partition of the optimizer state")
        t0 = time.time()
        tag = f"step-{step:08d}"
        if self.fs.exists(f"{self.path}/{tag}/COMPLETE"):
            return tag
        saved = _state_dicts(states)
        client_state = saved.get("train", {})
        base = self.local_root or self._staging
        private = f"{tag}.rank-{self.rank:05d}"
        shutil.rmtree(os.path.join(base, private), ignore_errors=True)
        os.makedirs(os.path.join(base, private))
        writer = engine.save_non_zero_checkpoint     # DeepSpeed writes the file on dp rank 0 only
        engine.save_non_zero_checkpoint = True
        try:
            engine._save_checkpoint(base, private, client_state={"sdn": saved})   # no barrier in it
        finally:
            engine.save_non_zero_checkpoint = writer
        if self.local_root:
            shutil.rmtree(os.path.join(base, tag), ignore_errors=True)   # a collective save cut short
            os.rename(os.path.join(base, private), os.path.join(base, tag))
        else:   # objects: each appears whole once uploaded; COMPLETE comes after them all
            for src, rel in _files(os.path.join(base, private)):
                self.fs.put_file(src, f"{self.path}/{tag}/{rel}")
            shutil.rmtree(os.path.join(base, private), ignore_errors=True)
        marker = dict(client_state, step=step, time=time.time(), alone=self.rank)
        fsio.atomic_write(f"{self.root}/{tag}/COMPLETE", json.dumps(marker))
        self._prune()
        self.last_save_seconds = time.time() - t0
        self._done_record(tag, step, client_state, t0, self.last_save_seconds, 0.0, alone=True)
        return tag

    def wait(self) -> bool:
        """Collective (every rank calls it at the same point): wait for the upload in flight, if
        any. True when it completed, False when it was given up; rank 0's verdict holds for all."""
        up, self._pending = self._pending, None
        if up is None:
            return True
        up.join()
        ok = up.ok
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
            dist.broadcast(flag, src=0)   # rank 0 decided COMPLETE after seeing every rank's marker
            ok = bool(flag.item())
        if not ok:
            self.failed.append(up.tag)
        return ok

    def finish(self) -> None:
        """End of the run (collective): the last checkpoint is stored, or the run fails (exit 1)
        so that a rerun resumes from the last complete one."""
        pending = self._pending
        if pending is not None and not self.wait():
            raise CheckpointUploadError(
                f"checkpoint {self.root}/{pending.tag} could not be uploaded "
                f"({pending.error or 'another rank failed'}); earlier checkpoints are intact")
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _done_record(self, tag: str, step: int, client_state: dict, t0: float, blocked: float, upload: float,
                     alone: bool = False) -> None:
        total = time.time() - t0
        by = f" by rank {self.rank} alone" if alone else ""
        self._say(f"checkpoint step {step} saved{by} in {total:.2f}s (training held {blocked:.2f}s)")
        self._report([{"event": "checkpoint", "step": step, "stage": client_state.get("stage"), "rank": self.rank,
                       "checkpoint_seconds": total, "blocked_seconds": blocked, "upload_seconds": upload,
                       "alone": alone, "time": time.time()}])

    def _prune(self) -> None:
        done = self.complete()
        for info in done[: max(0, len(done) - self.keep)]:
            self.fs.rm(f"{self.path}/{info['tag']}", recursive=True)


    def load(self, engine, tag: str, states: Mapping[str, object], module_only: bool = False) -> dict:
        """Load a complete checkpoint: the student into ``engine`` (with its optimizer and lr
        scheduler unless ``module_only``: a stage switch starts a fresh optimizer), and each of
        ``states`` (name -> object with ``load_state_dict``, or None to leave out) from what was
        saved under its name; a name the checkpoint lacks is left as it is. Returns everything
        the checkpoint saved beside the engine, by name.

        ZeRO 1-3 state saved at another world size (the engine's data-parallel size is not the
        number of optimizer partitions in the checkpoint) is converted first to DeepSpeed's
        universal checkpoint (``to_universal``) and loaded from it with ``load_universal``: the
        fp32 weights, the Adam moments and step are re-partitioned for this world size, the lr
        scheduler and the client state come from the model-states file as at the same size. A
        local ``out`` is converted once, by rank 0, into ``step-N/universal`` while the others
        wait; with a remote ``out`` each rank converts the copy it downloaded. At the same world
        size nothing of this happens (the load is the bit-exact one). A weights-only load
        (``module_only``) reads the model-states file at any world size."""
        self.wait()   # collective: the checkpoint being uploaded is complete first
        load_dir = self.local_root
        if not load_dir:
            load_dir = self._staging
            dst = os.path.join(load_dir, tag)
            shutil.rmtree(dst, ignore_errors=True)
            self.fs.get(f"{self.path}/{tag}", dst, recursive=True)
        verify_safe(os.path.join(load_dir, tag))
        if module_only and engine.zero_optimization_partition_weights():
            _point_latest_at(load_dir, tag)
        saved_world = _zero_partitions(os.path.join(load_dir, tag))
        what = dict(load_module_only=module_only, load_optimizer_states=not module_only,
                    load_lr_scheduler_states=not module_only)
        if not module_only and engine.zero_optimization() and 0 < saved_world != engine.dp_world_size:
            if not self.local_root or self.rank == 0:   # local: once, in the shared directory; remote: each its copy
                seconds = to_universal(os.path.join(load_dir, tag))
                self._say(f"checkpoint {tag}: ZeRO-{engine.zero_optimization_stage()} state of {saved_world} "
                          f"rank(s) converted for {engine.dp_world_size} in {seconds:.2f}s")
            if self.local_root:
                _barrier()
            path, client = _load_universal(engine, os.path.join(load_dir, tag), what)
        else:
            path, client = engine.load_checkpoint(load_dir, tag=tag, **what)
        if path is None:
            raise UserError(f"checkpoint {self.root}/{tag} could not be loaded")
        saved = _saved_states(client or {})
        for name, obj in states.items():
            if obj is not None and name in saved:
                obj.load_state_dict(saved[name])
        return saved


def _state_dicts(states: Mapping[str, object]) -> dict:
    """What ``save`` / ``save_alone`` store of ``states``: each one's ``state_dict()`` (a plain dict
    as it is), by name; None entries left out."""
    return {name: (s if isinstance(s, dict) else s.state_dict()) for name, s in states.items() if s is not None}


def _saved_states(client: dict) -> dict:
    """The named states of a checkpoint's DeepSpeed client state. Earlier checkpoints kept the
    train state under "sdn" and the RNG and EMA under "sdn_tensors": read under the same names."""
    sdn = client.get("sdn", {})
    if "sdn_tensors" in client:
        return {"train": sdn, **client["sdn_tensors"]}
    return dict(sdn)


def _files(local: str):
    """(path, path relative to ``local`` with "/") of every file under the directory ``local``."""
    for dirpath, _, names in os.walk(local):
        for name in sorted(names):
            src = os.path.join(dirpath, name)
            yield src, os.path.relpath(src, local).replace(os.sep, "/")


UNIVERSAL = "universal"   # a resized resume's DeepSpeed universal checkpoint, inside the tag's directory


def _zero_partitions(directory: str) -> int:
    """The data-parallel world size whose ZeRO optimizer partitions a checkpoint holds (one
    ``zero_pp_rank_R_..._optim_states.pt`` per rank; 0 at ZeRO 0)."""
    return len(glob.glob(os.path.join(directory, "*zero_pp_rank_*_optim_states.pt")))


def to_universal(directory: str) -> float:
    """Convert the DeepSpeed checkpoint in ``directory`` (ZeRO 1-3, partitioned over the world size
    that saved it) into DeepSpeed's universal checkpoint in ``directory/universal``: per parameter
    its fp32 weights, Adam moments and step, whole (``deepspeed/checkpoint/ds_to_universal.py``,
    in this process), beside the model-states file (lr scheduler, client state). An engine of any
    world size loads it with ``load_universal``. Rebuilt from the verified files every time (an
    earlier one is replaced, never trusted); returns the seconds it took."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    t0 = time.time()
    final, tmp = os.path.join(directory, UNIVERSAL), os.path.join(directory, f".{UNIVERSAL}-{os.getpid()}")
    for d in (final, tmp):
        shutil.rmtree(d, ignore_errors=True)
    args = argparse.Namespace(input_folder=directory, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):   # its progress bars
        ds_to_universal(args)
    os.replace(tmp, final)
    with contextlib.suppress(FileNotFoundError):   # its pointer for a load without a tag: loads here name one
        os.remove(os.path.join(directory, "latest_universal"))
    return time.time() - t0


def _load_universal(engine, directory: str, what: dict):
    """``engine.load_checkpoint`` of ``directory/universal`` (``to_universal``) with DeepSpeed's
    ``load_universal`` on (the config's ``"checkpoint": {"load_universal": true}``, which DeepSpeed
    reads at load time only), then the module's buffers. Returns what load_checkpoint does."""
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(directory, tag=UNIVERSAL, **what)
    finally:
        engine._config.load_universal_checkpoint = before
    if path is not None:
        _load_buffers(engine, os.path.join(directory, UNIVERSAL))
    return path, client


def _load_buffers(engine, directory: str) -> None:
    """DeepSpeed's universal load restores the parameters only (from ``zero/``), not the module's
    buffers (the caption statistics of ``model.text_norm=standardize``): those come from the
    checkpoint's model-states file, as a load at the same world size takes them."""
    files = sorted(glob.glob(os.path.join(directory, "*model_states.pt")))
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        saved = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


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


class _Upload:
    """One rank's upload of one checkpoint from local staging to ``out``; on rank 0 also the
    COMPLETE marker once every rank's ``.rank-NNNNN.done`` is there. Runs in a thread (or inline
    with ``checkpoint.background=false``); never raises: ``ok`` / ``error`` say how it went."""

    POLL_SECONDS = 0.2

    def __init__(self, ck: Checkpointer, tag: str, step: int, client_state: dict, t0: float):
        self.ck, self.tag, self.step, self.client_state, self.t0 = ck, tag, step, client_state, t0
        self.local = os.path.join(ck._staging, tag)
        self.remote = f"{ck.path}/{tag}"
        self.ok = False
        self.error: BaseException | None = None
        self.retries = 0
        self.blocked = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.blocked = time.time() - self.t0
        self._thread = threading.Thread(target=self.run, name=f"sdn-upload-{self.tag}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _retry(self, what: str, fn):
        """``fn()``, retried with exponential backoff: an object store that is briefly down or
        throttling (S3 503 SlowDown, a connection refused) does not lose the checkpoint."""
        cfg = self.ck.cfg
        delay = cfg.upload_retry_seconds
        for attempt in range(cfg.upload_retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - botocore, aiohttp and OSError alike; re-raised at the end
                if attempt == cfg.upload_retries:
                    raise
                self.retries += 1
                self.ck._say(f"checkpoint {self.tag}: {what} failed on rank {self.ck.rank} "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); retry {attempt + 1} in {delay:.1f}s")
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def run(self) -> None:
        ck, fs = self.ck, self.ck.fs
        t = time.time()
        try:
            for src, rel in _files(self.local):
                dst = f"{self.remote}/{rel}"
                self._retry(f"upload of {rel}", lambda src=src, dst=dst: fs.put_file(src, dst))
            self._retry("done marker", lambda: fs.pipe_file(f"{self.remote}/.rank-{ck.rank:05d}.done", b"ok"))
            upload = time.time() - t
            ck._report([{"event": "checkpoint_upload", "step": self.step, "stage": self.client_state.get("stage"), "rank": ck.rank, "upload_seconds": upload,
                         "retries": self.retries, "ok": True, "time": time.time()}])
            if ck.rank == 0:
                self._await_ranks()
                marker = dict(self.client_state, step=self.step, time=time.time())
                self._retry("COMPLETE marker", lambda: fs.pipe_file(f"{self.remote}/COMPLETE", json.dumps(marker).encode()))
                self.ok = True
                try:
                    ck._prune()
                except Exception as e:  # noqa: BLE001 - an old checkpoint left behind is no failure
                    ck._say(f"checkpoint pruning failed: {type(e).__name__}: {e}")
                ck._done_record(self.tag, self.step, self.client_state, self.t0, self.blocked or (time.time() - self.t0), upload)
            self.ok = True
        except Exception as e:  # noqa: BLE001 - reported, and the checkpoint given up
            self.error = e
            self.ok = False
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            ck._say(f"checkpoint {self.tag} given up on rank {ck.rank} after {self.retries} retries ({why}); "
                    "earlier checkpoints are intact")
            ck._report([{"event": "checkpoint_upload", "step": self.step, "stage": self.client_state.get("stage"), "rank": ck.rank, "upload_seconds": time.time() - t,
                         "retries": self.retries, "ok": False, "error": why, "time": time.time()}])
            try:   # best effort: tell rank 0 at once instead of letting it time out
                fs.pipe_file(f"{self.remote}/.rank-{ck.rank:05d}.failed", why.encode())
            except Exception:  # noqa: BLE001 - the store may be down: rank 0 then times out
                pass
            if ck.rank == 0:
                try:   # what did get uploaded is no checkpoint (no COMPLETE): free it
                    fs.rm(self.remote, recursive=True)
                except Exception:  # noqa: BLE001 - removed at the next start otherwise
                    pass
        finally:
            shutil.rmtree(self.local, ignore_errors=True)

    def _await_ranks(self) -> None:
        """Rank 0: until every rank's done marker is there (a failed marker or the timeout: raise)."""
        ck = self.ck
        want = {f".rank-{r:05d}.done" for r in range(ck.world_size)}
        deadline = time.time() + ck.cfg.upload_timeout_seconds
        while True:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in
                     self._retry("listing", lambda: ck.fs.ls(self.remote, detail=False, refresh=True))}
            failed = sorted(n for n in names if n.endswith(".failed"))
            if failed:
                raise CheckpointUploadError(f"upload failed on {', '.join(failed)}")
            if want <= names:
                return
            if time.time() > deadline:
                raise CheckpointUploadError(f"ranks {sorted(want - names)} did not finish uploading within "
                                            f"{ck.cfg.upload_timeout_seconds:g}s")
            time.sleep(self.POLL_SECONDS)


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO checkpoints pickle besides tensors and plain data."""
    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_safe(directory: str) -> None:
    """DeepSpeed loads checkpoints without torch's weights-only restriction, which would run any code a hostile
    file carries. Every file is first opened with torch's restricted unpickler (tensors, plain data
    and the allow-listed DeepSpeed classes only); anything else is refused before DeepSpeed sees it."""
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

