"""Alignment speed and agreement: OpenCV's warp (what of_face uses) vs the exact float64 numpy warp.

    python bench/align_speed.py [../shared/data/ijbc_mini]

Warps every image of the IJB layout onto the 112x112 template both ways (decoding excluded) and
prints ms per image and the largest grey-level difference between the two.
"""
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from of_face.eval.align import ARCFACE_TEMPLATE, align_face, estimate_similarity, warp_affine
from of_face.eval.ijb import read_layout

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/ijbc_mini")
layout = read_layout(root, "IJBC")
images = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in layout["images"]]
lmks = layout["landmarks"]
timings, diff = {}, 0
for name, fn in (("opencv", lambda im, lm: align_face(im, lm)),
                 ("numpy", lambda im, lm: warp_affine(im, estimate_similarity(lm, ARCFACE_TEMPLATE), (112, 112)))):
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        out = [fn(im, lm) for im, lm in zip(images, lmks)]
        best = min(best, time.perf_counter() - t)
    timings[name] = (best / len(images) * 1e3, out)
diff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(timings["opencv"][1], timings["numpy"][1]))
for name, (ms, _) in timings.items():
    print(f"{name}: {ms:.3f} ms per image ({len(images)} images, best of 3)")
print(f"opencv is {timings['numpy'][0] / timings['opencv'][0]:.1f}x faster; max |opencv - numpy| {diff} grey levels")
