"""The DDP peer against the trainer's DeepSpeed engine with each ``deepspeed.grad_reduce``, interleaved.

    python benchmarks/grad_reduce_ab.py --out grad-reduce.json [--preset demo] [--rounds 12] [--chunk 10]

Two processes (gloo on 127.0.0.1, 1 thread each, as sdn_dist/apps/bench/peer.py) build, side by
side, the DDP peer (torch DDP + Adam on the bench's student) and one trainer engine
(``loop.build_engine``) per ``deepspeed.grad_reduce`` mode (engine / overlap / shm), then time them
in turns: each round runs a chunk of ``--chunk`` steps of every variant, in an order rotated each
round, on the same in-memory batches (random, at the preset's size; rank r its slice). On a shared
machine the load moves between minutes by more than the differences sought; alternating chunks of
a few seconds in the same processes puts every variant under the same load, and the per-round
ratios (variant / DDP of the same round) are paired. Reports, per stage and variant, the median
samples/s over the rounds and the median paired ratio to DDP, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdn_dist.apps.bench.peer import build_models
from sdn_dist.config import Config, load_config
from sdn_dist.model.losses import stages
from sdn_dist.net import free_port
from sdn_dist.training.loop import build_engine, distill_step, prepare_batch

MODES = ("engine", "overlap", "shm")


def _rank_main(rank, port, cfg_json, batches, stage, modes, rounds, chunk, warmup, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = Config.model_validate(cfg_json)
    st = stages(cfg.stage1, cfg.stage2)[stage - 1]
    text_dim = batches[0][1].shape[1]
    teacher, student = build_models(cfg, text_dim, cfg.seed)
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.Adam(ddp.parameters(), lr=st.config.lr, betas=st.config.betas)
    engines = {}
    for m in modes:                       # "overlap:100000": with that overlap_bucket_size
        mode, _, bucket = m.partition(":")
        ds = {"grad_reduce": mode, **({"overlap_bucket_size": int(bucket)} if bucket else {})}
        c = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update=ds)})
        engines[m] = build_engine(c, st.config, text_dim, torch.device("cpu"), {"mean": [0.0] * text_dim, "std": 1.0})
    micro = batches[0][0].shape[0] // 2

    def step(name, i):
        image, text = batches[i % len(batches)]
        real, text = prepare_batch(image[rank * micro:(rank + 1) * micro], text[rank * micro:(rank + 1) * micro],
                                   torch.device("cpu"), torch.float32)
        if name == "ddp":
            loss, _ = distill_step(teacher, ddp, real, text, st, cfg.autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            e = engines[name]
            loss, _ = distill_step(teacher, e, real, text, st, cfg.autocast)
            e.backward(loss)
            e.step()
        return loss.detach()

    names = ["ddp", *modes]
    for name in names:
        for i in range(warmup):
            step(name, i)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            torch.stack([step(name, r * chunk + i) for i in range(chunk)]).tolist()   # host sync, as the log step
            times[name].append(time.perf_counter() - t)
    digests = {}
    for m in modes:
        flat = torch.cat([p.detach().reshape(-1) for p in engines[m].module.parameters()])
        digests[m] = float(flat.double().sum())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"times": times, "digests": digests}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES), help="grad_reduce modes; overlap:N = bucket of N elements")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    cfg = load_config(a.preset, overrides=["teacher.weights=random", "workers=2", *a.set])
    torch.manual_seed(0)
    s, n = cfg.model.image_size, cfg.data.batch_size
    batches = [(torch.rand(n, 3, s, s), torch.randn(n, cfg.text.dim)) for _ in range(4)]
    modes = a.modes.split(",")
    res = {"preset": a.preset, "set": a.set, "rounds": a.rounds, "chunk": a.chunk, "batch": n, "stages": {}}
    for stage in map(int, a.stages.split(",")):
        l0 = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="sdn-gr-ab-") as d:
            mp.spawn(_rank_main, args=(free_port(), cfg.model_dump(mode="json"), batches, stage, modes, a.rounds,
                                       a.chunk, a.warmup, d), nprocs=2, join=True)
            ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2)]
        times = ranks[0]["times"]
        sps = {k: [n * a.chunk / t for t in v] for k, v in times.items()}
        out = {"load_before": l0, "load_after": os.getloadavg(), "samples_per_sec": sps,
               "digests_rank0": ranks[0]["digests"], "digests_rank1": ranks[1]["digests"], "summary": {}}
        print(f"stage {stage}, load {l0[0]:.2f} -> {out['load_after'][0]:.2f}")
        for k, v in sps.items():
            ratio = statistics.median(x / y for x, y in zip(v, sps["ddp"]))
            out["summary"][k] = {"median_samples_per_sec": statistics.median(v), "median_ratio_to_ddp": ratio}
            print(f"  {k:8s} median {statistics.median(v):7.1f} samples/s, paired ratio to DDP {ratio:.3f}")
        print(f"  weights: same on both ranks {ranks[0]['digests'] == ranks[1]['digests']}, "
              f"same across modes {len(set(ranks[0]['digests'].values())) == 1}")
        res["stages"][stage] = out
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
