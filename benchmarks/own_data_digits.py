"""The README's own-data flow on real data that is not ours: the UCI handwritten digits.

    pip install scikit-learn        # only for its copy of the data (sklearn/datasets/data/digits.csv.gz)
    python benchmarks/own_data_digits.py --out runs/digits [--quick] [--only folder|img2dataset]

1,797 scans of handwritten digits (8x8 grey, 43 writers; UCI "optdigits" as scikit-learn ships
it), in the two layouts a user brings:

* folder: ``my-photos/img/NNNN.png`` (8x8 grey PNGs, dark ink on white) + ``captions.jsonl``
  with two captions per image ("a handwritten digit seven", "the number 7 written by hand") and
  the digit's name as ``label``;
* img2dataset: ``img2dataset-out/00000.tar`` ... (200 samples each, 32x32 JPEG, ``.txt`` and
  ``.json`` as img2dataset writes them, no label), the last tar held out as the test split.

Then the README's commands with the `demo` preset, as a user would type them (`--quick`: 600 +
600 student steps and 500 teacher steps instead of the preset's 2700 + 2700 and 1500). Writes
``summary.json``: the teacher's objective and held-out score, the eval report's SSIM, FSIM and,
for the labelled folder, the independent judge's digit accuracy on generated and real images.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = "zero one two three four five six seven eight nine".split()


def digits_csv() -> str:
    import sklearn.datasets
    return str(Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz")


def write_layouts(root: Path, csv: str) -> None:
    import webdataset as wds
    rows = np.loadtxt(gzip.open(csv), delimiter=",")
    photos = root / "my-photos"
    (photos / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for i, r in enumerate(rows):
        ink = 255 - (r[:64].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)   # [8, 8] grey
        d = int(r[64])
        Image.fromarray(ink, "L").save(photos / "img" / f"{i:04d}.png")
        lines.append({"image": f"img/{i:04d}.png", "label": NAMES[d],
                      "captions": [f"a handwritten digit {NAMES[d]}", f"the number {d} written by hand"]})
    (photos / "captions.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    web = root / "img2dataset-out"
    web.mkdir(exist_ok=True)
    order = list(range(len(rows)))
    rng.shuffle(order)
    for s in range(0, len(order), 200):
        with wds.TarWriter(str(web / f"{s // 200:05d}.tar")) as tw:
            for i in order[s:s + 200]:
                r, d = rows[i], int(rows[i][64])
                ink = 255 - (r[:64].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(ink, "L").resize((32, 32), Image.BICUBIC).convert("RGB").save(buf, "JPEG", quality=95)
                cap = rng.choice([f"a handwritten digit {NAMES[d]}", f"the number {d} written by hand"])
                tw.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": cap,
                          "json": json.dumps({"caption": cap, "key": f"{i:09d}", "status": "success",
                                              "width": 32, "height": 32}).encode()})


def flows(quick: bool) -> dict[str, list[str]]:
    q = (" --set teacher.train.steps=500" if quick else "")
    s = (" --set stage1.steps=600 --set stage2.steps=600" if quick else "")
    return {
        "folder": [
            "sdn-dist shards convert folder --images my-photos --captions my-photos/captions.jsonl --out shards/mine --test-fraction 0.1",
            "sdn-dist teacher train --shards shards/mine --out runs/mine-teacher.pt --preset demo" + q,
            "sdn-dist train --preset demo --set data.train=shards/mine --set data.test=shards/mine "
            "--set teacher.weights=runs/mine-teacher.pt --set out=runs/mine --quiet" + s,
            'sdn-dist generate --checkpoint runs/mine --text "a handwritten digit seven" --text "the number 3 written by hand" --out runs/mine/generated',
            "sdn-dist eval --checkpoint runs/mine --shards shards/mine --out runs/mine/report.json",
        ],
        "img2dataset": [
            "sdn-dist teacher train --shards 'img2dataset-out/{00000..00007}.tar' --out runs/web-teacher.pt --preset demo" + q,
            "sdn-dist train --preset demo --set data.train='img2dataset-out/{00000..00007}.tar' "
            "--set data.test=img2dataset-out/00008.tar --set teacher.weights=runs/web-teacher.pt --set out=runs/web --quiet" + s,
            'sdn-dist generate --checkpoint runs/web --text "a handwritten digit seven" --text "the number 3 written by hand" --out runs/web/generated',
            "sdn-dist eval --checkpoint runs/web --shards img2dataset-out/00008.tar --out runs/web/report.json",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/digits")
    ap.add_argument("--csv", default=None, help="digits.csv.gz (default: scikit-learn's copy)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="folder or img2dataset")
    a = ap.parse_args()
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "my-photos" / "captions.jsonl").exists():
        write_layouts(root, a.csv or digits_csv())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    summary = {"command": ["python", "benchmarks/own_data_digits.py"] + sys.argv[1:], "flows": {}}
    for name, lines in flows(a.quick).items():
        if a.only and name != a.only:
            continue
        run = "mine" if name == "folder" else "web"
        t0, seconds = time.time(), []
        for line in lines:
            t = time.time()
            print(f"$ {line}", flush=True)
            subprocess.run(["bash", "-c", line], cwd=root, env=env, check=True)
            seconds.append(round(time.time() - t, 1))
        import torch
        meta = torch.load(root / "runs" / f"{run}-teacher.pt", weights_only=True)["meta"]
        rep = json.loads((root / "runs" / run / "report.json").read_text())
        summary["flows"][name] = {
            "lines": lines, "seconds": seconds, "total_seconds": round(time.time() - t0, 1),
            "teacher": {"objective": meta.get("objective"), "accuracy": meta.get("accuracy")},
            "report": {k: rep.get(k) for k in ("n_images", "ssim", "fsim", "attribute_accuracy",
                                               "attribute_accuracy_real", "notes")},
        }
        (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
