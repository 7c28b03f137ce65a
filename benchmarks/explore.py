"""Fast in-process exploration of the SDN stages (plain PyTorch, no Ray/DeepSpeed).

    python benchmarks/explore.py --shards /tmp/demo/shards --teacher /tmp/demo/teacher.pt \
        --evaluator runs/x/evaluator.pt --s1 1500 --s2 1500 --out /tmp/explore/x

Same Student, Teacher and loss code as `sdn-dist train` (sdn_dist.student / teacher / losses);
the data are the shards decoded once into memory (images + stored caption embeddings), a random
caption per sample per step. Meant for choosing hyper-parameters quickly: the numbers that the
docs report come from the real `sdn-dist demo` / `sdn-dist train` / `sdn-dist eval` commands.
Prints the independent evaluator's accuracy on the test split (seen / held-out) at every
``--eval-every`` steps and at each stage end, and writes a sample grid PNG there.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import tarfile
import time

import numpy as np
import torch
from PIL import Image


def load_split(shards: str, split: str, size: int) -> dict:
    """All samples of ``split`` -> {"images" uint8 [N,3,S,S], "emb" [N,K,D], "metas"}."""
    cache = os.path.join(shards, f".explore-{split}-{size}.pt")
    if os.path.exists(cache):
        return torch.load(cache, weights_only=False)
    items: dict[str, dict] = {}
    for url in sorted(glob.glob(os.path.join(shards, f"{split}-*.tar"))):
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = tf.extractfile(m).read()
    keys = sorted(items)
    imgs, embs, metas = [], [], []
    for k in keys:
        it = items[k]
        img = Image.open(io.BytesIO(it["png"])).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        embs.append(torch.from_numpy(np.load(io.BytesIO(it["emb.npy"]))))
        metas.append(json.loads(it["json"]))
    out = {"images": torch.stack(imgs), "emb": torch.stack(embs), "metas": metas, "keys": keys}
    torch.save(out, cache)
    return out


@torch.no_grad()
def evaluate(student, test, ev, batch: int = 200) -> dict:
    student.eval()
    gen = torch.cat([student(test["emb"][s:s + batch, 0])["image"].clamp(0, 1)
                     for s in range(0, len(test["metas"]), batch)])
    student.train()
    pg = ev.predict(gen)
    tg = ev.targets(test["metas"])
    kinds = np.array([m.get("split_kind", "all") for m in test["metas"]])
    res = {}
    for kind in ("seen", "heldout"):
        sel = torch.from_numpy(kinds == kind)
        acc = {a: round(float((pg[a][sel] == tg[a][sel]).float().mean()), 3) for a in ev.names}
        acc["mean"] = round(float(np.mean(list(acc.values()))), 3)
        res[kind] = acc
    return res, gen


def fsim_ssim(gen, real, n: int = 200) -> tuple[float, float]:
    import piq
    g, r = gen[:n].float(), real[:n].float() / 255
    return (round(float(piq.ssim(g, r, data_range=1.0)), 4), round(float(piq.fsim(g, r, data_range=1.0)), 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default="/tmp/demo/shards")
    ap.add_argument("--teacher", default="/tmp/demo/teacher.pt", help="'' = random init")
    ap.add_argument("--evaluator", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--s1", type=int, default=1500)
    ap.add_argument("--s2", type=int, default=1500)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--w1", default="{}", help="stage-1 point weights JSON")
    ap.add_argument("--w2", default="{}", help="stage-2 point weights JSON")
    ap.add_argument("--only-image1", action="store_true", help="stage 1: every weight 0 but image")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=float, default=1 / 8)
    ap.add_argument("--fc", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--init", default="kaiming")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from sdn_dist.config import ModelConfig, StageConfig, TeacherConfig
    from sdn_dist.evaluator import load_evaluator
    from sdn_dist.losses import stage1_loss, stage2_loss
    from sdn_dist.samples import grid_png
    from sdn_dist.student import Student
    from sdn_dist.teacher import build_teacher
    from sdn_dist.vgg import POINTS

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train = load_split(args.shards, "train", args.size)
    test = load_split(args.shards, "test", args.size)
    ev = load_evaluator(args.evaluator)
    mc = ModelConfig(image_size=args.size, width=args.width, fc_dim=args.fc, init=args.init)
    teacher = build_teacher(mc, TeacherConfig(weights=args.teacher))
    student = Student(mc, train["emb"].shape[-1])
    w1 = json.loads(args.w1)
    if args.only_image1:
        w1 = {p: 0.0 for p in POINTS if p != "image"}
    s1 = StageConfig(lr=args.lr1, point_weights=w1, weight_decay=args.wd)
    s2 = StageConfig(lr=args.lr2, point_weights=json.loads(args.w2), weight_decay=args.wd)
    n, k = train["emb"].shape[:2]
    g = torch.Generator().manual_seed(args.seed)
    log = open(os.path.join(args.out, "log.jsonl"), "a")

    def report(step, stage, t0, loss):
        acc, gen = evaluate(student, test, ev)
        ssim, fsim = fsim_ssim(gen, test["images"])
        rec = {"step": step, "stage": stage, "loss": round(loss, 4), "ssim": ssim, "fsim": fsim,
               "seen": acc["seen"], "heldout": acc["heldout"], "sec": round(time.time() - t0)}
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        with open(os.path.join(args.out, f"grid-{step:05d}.png"), "wb") as f:
            f.write(grid_png(gen[:12], test["images"][:12].float() / 255))

    t0 = time.time()
    step = 0
    for stage, steps, scfg in ((1, args.s1, s1), (2, args.s2, s2)):
        if steps == 0:
            continue
        opt = torch.optim.AdamW(student.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay) \
            if scfg.weight_decay else torch.optim.Adam(student.parameters(), lr=scfg.lr)
        ema = None
        for i in range(steps):
            idx = torch.randint(n, (args.batch,), generator=g)
            cap = torch.randint(k, (args.batch,), generator=g)
            real = train["images"][idx].float() / 255
            text = train["emb"][idx, cap]
            with torch.no_grad():
                t_real = teacher(real)
            out = student(text)
            if stage == 1:
                loss, _ = stage1_loss(t_real, out, scfg)
            else:
                loss, _ = stage2_loss(t_real, teacher(out["image"]), scfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
            if step % args.eval_every == 0 or i == steps - 1:
                report(step, stage, t0, ema)
    torch.save(student.state_dict(), os.path.join(args.out, "student.pt"))


if __name__ == "__main__":
    main()
