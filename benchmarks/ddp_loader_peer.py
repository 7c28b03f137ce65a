"""What a user would write instead of `sdn-dist train`: a torchrun DDP script over the same shards.

    torchrun --nproc-per-node 2 benchmarks/ddp_loader_peer.py --config run/config.yaml \
        --steps 40 --out peer.json

`sdn-dist bench` runs it as the peer of `loader_ddp_ratio` (docs/performance.md): 2 processes x 1
thread, gloo on CPUs (nccl on GPUs), torch's DistributedDataParallel and Adam, and per rank a
webdataset loader with one worker process that reads the training shards, decodes the PNGs and
takes each caption's embedding (the shard's stored row when it has one, else the text encoder)
the way sdn-dist's readers do. The model, the teacher and the step (`distill_step`) are the
product's: only the harness around them is the user's. Rank 0 writes samples/s per chunk of
``--chunk`` steps (the trainer's logging window), the time spent waiting for the loader, and
every step's loss.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.nn.parallel import DistributedDataParallel

from sdn_dist.config import load_config
from sdn_dist.data.pipeline import decode_captions, decode_image
from sdn_dist.data.shards import expand_urls
from sdn_dist.data.text import build_text_encoder
from sdn_dist.model.losses import stages
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import build_teacher
from sdn_dist.training.loop import distill_step, prepare_batch, prepare_student, prepare_teacher
from sdn_dist.training.loop import with_resolved_autocast


def make_loader(cfg, micro_batch: int, seed: int):
    """Endless micro-batches (uint8 images [b,S,S,3], float32 text [b,D]) of this rank's shards:
    webdataset splits the shards over ranks (and its one worker), shuffles in a buffer of
    ``data.shuffle_buffer`` samples, and the worker decodes."""
    encoder = build_text_encoder(cfg.text)
    rng = random.Random(seed)

    def decode(sample):
        captions = decode_captions(sample["txt"])
        c = rng.randrange(len(captions))
        if "emb.npy" in sample:           # the shard's stored rows (sdn-dist shards write them)
            text = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False).reshape(len(captions), -1)[c]
        else:
            text = encoder.encode([captions[c]])[0]
        return decode_image(sample["png"], cfg.model.image_size), np.asarray(text, np.float32)

    urls = expand_urls(cfg.data.train, split="train")
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, nodesplitter=wds.split_by_node)
          .shuffle(cfg.data.shuffle_buffer, rng=random.Random(seed))
          .map(decode)
          .batched(micro_batch, partial=False)
          .repeat())                      # epoch after epoch
    return wds.WebLoader(ds, batch_size=None, num_workers=1, prefetch_factor=cfg.data.prefetch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a run's config.yaml (data.train, model, stages)")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per stage first")
    ap.add_argument("--chunk", type=int, default=5, help="steps per timed chunk")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    cfg = load_config(file=a.config)
    torch.set_num_threads(cfg.threads_per_worker)
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_gpu else "gloo")   # RANK, WORLD_SIZE, MASTER_* from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_gpu else "cpu")
    cfg, autocast = with_resolved_autocast(cfg, device)    # autocast=auto: bf16 where the device has it
    micro = cfg.data.batch_size // world
    batches = iter(make_loader(cfg, micro, cfg.seed + rank))

    torch.manual_seed(cfg.seed)        # the same initial weights on every rank
    teacher = prepare_teacher(build_teacher(cfg.model, cfg.teacher)).to(device)
    student = prepare_student(Student(cfg.model, cfg.text.dim)).to(device)
    model = DistributedDataParallel(student, device_ids=[device.index] if use_gpu else None)

    results = {"world": world, "micro_batch": micro, "backend": dist.get_backend(), "autocast": autocast, "stages": {}}
    for stage in [int(s) for s in a.stages.split(",")]:
        the_stage = stages(cfg.stage1, cfg.stage2)[stage - 1]     # its config section and loss
        hp = the_stage.config
        opt = torch.optim.Adam(model.parameters(), lr=hp.lr, betas=hp.betas)
        losses, chunks, wait = [], [], 0.0

        def step() -> torch.Tensor:
            nonlocal wait
            t = time.perf_counter()
            image, text = next(batches)
            wait += time.perf_counter() - t
            real, text = prepare_batch(image, text, device, torch.float32)
            loss, _ = distill_step(teacher, model, real, text, the_stage, cfg.autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        losses += [float(step()) for _ in range(a.warmup)]
        wait, timed = 0.0, 0.0
        for c0 in range(0, a.steps, a.chunk):
            t = time.perf_counter()
            out = [step() for _ in range(min(a.chunk, a.steps - c0))]
            losses += torch.stack(out).tolist()     # read back, as the trainer's log step does
            dt = time.perf_counter() - t
            timed += dt
            chunks.append(cfg.data.batch_size * len(out) / dt)
        results["stages"][f"stage{stage}"] = {
            "chunk_samples_per_sec": chunks, "mean_samples_per_sec": cfg.data.batch_size * a.steps / timed,
            "data_wait_fraction": wait / timed, "losses": losses}
    # the ranks' weights after training: equal when DDP averaged every gradient
    with torch.no_grad():
        digest = float(sum(p.double().sum() for p in student.parameters()))
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    results["param_sums"] = digests
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
