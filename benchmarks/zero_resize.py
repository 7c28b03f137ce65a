"""What a resize costs at ZeRO 1-3: the online conversion to DeepSpeed's universal checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/zero_resize.py --preset demo [--repeats 3]

Two spawned gloo ranks build the loop's engine of ``--preset`` (``loop.build_engine``) at each
ZeRO stage, take one step and save through the ``Checkpointer``; then this process (world 1)
times ``checkpoint.to_universal`` on each checkpoint (``--repeats`` times, the median) and one
``Checkpointer.load`` of it into a 1-rank engine (conversion included). Prints one JSON line per
stage: parameters, checkpoint MB, conversion seconds, load seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STAGES = (1, 2, 3)


def _cfg(preset: str, tmp: str, stage: int, workers: int):
    from sdn_dist.config import load_config
    return load_config(preset, overrides=[f"workers={workers}", f"out={tmp}/zero{stage}", f"deepspeed.zero_stage={stage}",
                                          "ema.decay=0", "teacher.weights=random", "model.text_norm=none"])


def _save(rank: int, port: int, preset: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sdn_dist.training.checkpoint import Checkpointer
    from sdn_dist.training.loop import build_engine
    for stage in STAGES:
        cfg = _cfg(preset, tmp, stage, 2)
        engine = build_engine(cfg, cfg.stage1, cfg.text.dim, torch.device("cpu"))
        out = engine(torch.randn(cfg.micro_batch_at(2), cfg.text.dim))
        engine.backward(sum(v.float().square().mean() for v in out.values()))
        engine.step()
        Checkpointer(cfg.out, keep=1, rank=rank, world_size=2).save(engine, 1, {"train": {"stage": 1}})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from sdn_dist.training.checkpoint import Checkpointer, to_universal
    from sdn_dist.training.loop import build_engine
    tmp = tempfile.mkdtemp(prefix="zero-resize-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save, args=(port, args.preset, tmp), nprocs=2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    for stage in STAGES:
        cfg = _cfg(args.preset, tmp, stage, 1)
        ckpt = os.path.join(cfg.out, "checkpoints", "step-00000001")
        size = sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt) if n.endswith(".pt"))
        seconds = statistics.median(to_universal(ckpt) for _ in range(args.repeats))
        engine = build_engine(cfg, cfg.stage1, cfg.text.dim, torch.device("cpu"))
        t0 = time.time()
        Checkpointer(cfg.out, keep=1).load(engine, "step-00000001", {})
        print(json.dumps({"preset": args.preset, "zero_stage": stage, "saved_world_size": 2, "world_size": 1,
                          "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
                          "checkpoint_mb": round(size / 1e6, 2), "convert_seconds": round(seconds, 3),
                          "load_seconds_with_conversion": round(time.time() - t0, 3)}), flush=True)


if __name__ == "__main__":
    main()
