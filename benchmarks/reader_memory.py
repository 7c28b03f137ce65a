"""Peak resident memory of one shard reader fed the worst samples the caps allow (and worse).

    python benchmarks/reader_memory.py --out runs/reader-memory [--encoder minilm]

Each case runs in a fresh process that does what a ``ShardReader`` actor does (a ``RankStream``
with the text encoder, single-threaded, micro-batches of ``--batch``) over a shard written for
the case, and reports the process's peak RSS (VmHWM) beside its RSS after start-up (imports and
the encoder loaded, before the first sample). Cases:

* ``captions``: 40 samples, each one caption of 100 KB (the issue's hostile shard), with the caps;
* ``captions-uncapped``: the same with ``max_caption_chars`` off (what the readers did before);
* ``image-at-cap``: 2 incompressible RGBA PNGs of exactly ``data.max_image_pixels`` (4096x4096),
  each with 16 captions of ``max_caption_chars`` (the worst sample the defaults allow);
* ``image-pillow-limit``: an 89 Mpx image, just under Pillow's decompression-bomb limit (skipped
  by the pixel cap, never decoded);
* ``image-pillow-limit-uncapped``: the same with the pixel cap off.

Writes ``<out>/reader_memory.json``; docs/reliability.md quotes the figures. Not a CI test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("captions", "captions-uncapped", "image-at-cap", "image-pillow-limit", "image-pillow-limit-uncapped")


def _png(w: int, h: int, noise: bool, mode: str = "RGB") -> bytes:
    import numpy as np
    from PIL import Image
    if noise:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    else:
        img = Image.new(mode, (w, h), (200, 40, 40))
    b = io.BytesIO()
    img.save(b, "PNG", compress_level=0 if noise else 1)
    return b.getvalue()


def write_shard(case: str, path: Path) -> None:
    import webdataset as wds

    from sdn_dist.config import MAX_CAPTION_CHARS, MAX_IMAGE_PIXELS
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    with wds.TarWriter(str(path)) as w:
        if case.startswith("captions"):
            img = _png(64, 64, noise=False)
            for i in range(40):
                w.write({"__key__": f"s{i:03d}", "png": img,
                         "txt": (f"caption {i} " + "a red circle on a blue background " * 3000)[:100_000].encode()})
        elif case == "image-at-cap":
            img = _png(side, side, noise=True, mode="RGBA")
            caps = "\n".join((f"{j} " + "a large red circle " * 100)[:MAX_CAPTION_CHARS] for j in range(16))
            for i in range(2):
                w.write({"__key__": f"s{i:03d}", "png": img, "txt": caps.encode()})
        else:
            # 89,000,000 pixels: under Image.MAX_IMAGE_PIXELS (89,478,485), so Pillow itself warns
            # at most and decodes it
            w.write({"__key__": "big", "png": _png(10000, 8900, noise=False), "txt": b"a huge image"})
            # and one ordinary sample: an epoch with nothing usable would (rightly) stop the reader
            w.write({"__key__": "small", "png": _png(64, 64, noise=False), "txt": b"a small image"})


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: str, shard: Path, encoder: str, batch: int) -> dict:
    """In this (fresh) process: read the whole shard as a reader would, return the memory."""
    import torch
    torch.set_num_threads(1)
    from sdn_dist.config import DataConfig, TextConfig
    from sdn_dist.data.pipeline import RankStream, sample_caps
    from sdn_dist.data.shards import shard_counts
    from sdn_dist.data.text import build_text_encoder

    enc = build_text_encoder(TextConfig(encoder=encoder, dim=384 if encoder == "minilm" else 32))
    enc.encode(["warm up the model"])          # the model loaded: part of the baseline
    caps = sample_caps(DataConfig())
    if case == "captions-uncapped":
        caps["max_caption_chars"] = None
    elif case == "image-pillow-limit-uncapped":
        caps["max_image_pixels"] = None
    stream = RankStream([str(shard)], shard_counts([str(shard)]), shuffle=False, image_size=64,
                        text_encoder=enc, caption="first", **caps)
    base = rss_bytes("VmRSS")
    t = time.time()
    n = 0
    for b in stream.iter_samples(0, 0, 1, batch, stream.epoch_start(1)):
        n += len(b["captions"])
    return {"case": case, "caps": caps, "encoder": encoder, "batch": batch, "samples_used": n,
            "skipped": stream.skips.as_dict(), "shard_bytes": shard.stat().st_size,
            "rss_after_startup_mib": round(base / 2**20, 1), "peak_rss_mib": round(rss_bytes("VmHWM") / 2**20, 1),
            "read_seconds": round(time.time() - t, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/reader-memory")
    ap.add_argument("--encoder", default="minilm", choices=["minilm", "hash"])
    ap.add_argument("--batch", type=int, default=16, help="micro-batch (the demo's global batch)")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)   # internal: run one case in this process
    args = ap.parse_args()
    out = Path(args.out)
    if args.case:
        print(json.dumps(run_case(args.case, out / f"{args.case}.tar", args.encoder, args.batch)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases:
        shard = out / f"{case}.tar"
        if not shard.exists():
            write_shard(case, shard)
        r = subprocess.run([sys.executable, __file__, "--out", str(out), "--encoder", args.encoder,
                            "--batch", str(args.batch), "--case", case],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"{case:28s} peak {res['peak_rss_mib']:8.1f} MiB  after start-up {res['rss_after_startup_mib']:7.1f} MiB  "
              f"used {res['samples_used']:3d}  skipped {res['skipped']}", flush=True)
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "loadavg": os.getloadavg()}
    (out / "reader_memory.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
