"""CPU time one shard reader spends per sample, epoch by epoch, with and without data.cache_bytes.

    python benchmarks/reader_cpu.py --out reader-cpu.json [--samples 1000] [--epochs 4]

What a ``ShardReader`` actor does for rank 0 of 2 (a ``RankStream`` over synthetic 64-px shards
with the caption embeddings stored, as `sdn-dist demo` writes them; one thread; the uint8
micro-batches of 8 the trainer asks for), timed with this process's CPU clock
(``time.process_time``): tar reading, PNG decoding, caption choice and the stored embedding row.
The readers' share of a core at a training speed is these seconds per sample x the samples/s one
rank consumes (e.g. ~100 in the demo's 2 x 1 layout). The first epoch decodes every image; later
ones take them from the cache when it is on (the cache
fills over the first epochs: each epoch a rank takes every other micro-batch of the one global
order, so a different half of the samples). Every run's batches are compared: they must be equal.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sdn_dist.config import load_config
from sdn_dist.data.pipeline import RankStream
from sdn_dist.data.shards import expand_urls, shard_counts
from sdn_dist.apps.synth.dataset import make_synth
from sdn_dist.data.text import build_text_encoder


MODES = {   # data.* settings per run; the demo preset has keep_in_memory on
    "none": {},
    "cache_bytes": {"cache_bytes": 1 << 30},
    "keep_in_memory": {"keep_in_memory": True},
    "keep_in_memory+cache_bytes": {"keep_in_memory": True, "cache_bytes": 1 << 30},
}


def run(urls, counts, cfg, encoder, epochs: int, **kw) -> tuple[list[float], list, RankStream]:
    stream = RankStream(urls, counts, rank=0, world_size=2, seed=0, shuffle=True, image_size=64,
                        text_encoder=encoder, shuffle_buffer=cfg.data.shuffle_buffer, **kw)
    per_epoch, batches = [], []
    for e in range(epochs):
        start, stop = stream.epoch_start(e), stream.epoch_start(e + 1)
        t, n = time.process_time(), 0
        for b in stream.iter_samples(start, batch_size=8, stop_sample=stop, uint8=True):
            batches.append((b["key"], b["image"], b["text"]))
            n += b["size"]            # this rank's positions (the epoch's are global)
        per_epoch.append((time.process_time() - t) / n)
    return per_epoch, batches, stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("demo", overrides=["text.encoder=hash", "text.dim=384"])
    encoder = build_text_encoder(cfg.text)
    res = {"samples": a.samples, "rank": "0 of 2", "epochs": a.epochs, "cpu_seconds_per_sample": {},
           "steady_cpu_seconds_per_sample": {}, "same_batches": True}
    with tempfile.TemporaryDirectory() as d:
        make_synth(out=d, train=a.samples, test=8, size=64, per_shard=250, seed=0, progress=False, embed=encoder)
        urls = expand_urls(f"{d}/train-*.tar")
        counts = shard_counts(urls)
        res["shard_bytes"] = sum(Path(u).stat().st_size for u in urls)
        reference = None
        for name, kw in MODES.items():
            try:
                per_epoch, batches, stream = run(urls, counts, cfg, encoder, a.epochs, **kw)
            except TypeError:      # a version of sdn_dist without that setting
                continue
            res["cpu_seconds_per_sample"][name] = per_epoch
            if getattr(stream, "cached_bytes", 0):
                res["cached_bytes"] = stream.cached_bytes      # what one reader kept of its samples
            # a rank sees every sample after ~world_size epochs: the last half is the steady state
            res["steady_cpu_seconds_per_sample"][name] = sum(per_epoch[a.epochs // 2:]) / (a.epochs - a.epochs // 2)
            reference = reference or batches
            res["same_batches"] &= len(batches) == len(reference) and all(
                k1 == k2 and torch.equal(i1, i2) and torch.equal(t1, t2)
                for (k1, i1, t1), (k2, i2, t2) in zip(batches, reference))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
