"""Synthetic face-like identities in insightface's formats (the trainer's built-in dataset).

Every identity is a cartoon face drawn from a small parameter vector, and every image of it a new
expression, yaw, pose, lighting, blur, noise and occluder (of_face/data/synthetic_faces.py), all
scaled by ``difficulty``. Raw pixels are then a poor identity descriptor while a small CNN can learn
the invariances.

Output (``out_dir``): ``train.rec``/``train.idx``/``property`` laid out like insightface's packers
(record 0 header, image records 1..N, one range record per class), ``synth_val.bin`` (verification
pairs of identities that are not in the training set) and ``synthetic.json`` (parameters + summary).
Everything is a function of the parameters: the same seed gives byte-identical files.
"""
import argparse
import fcntl
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from of_face.data import record_index
from of_face.data.synthetic_faces import DIFFICULTY, SIZE, identity_params, render
from of_face.data.verification_bin import write_bin
from of_face.io import atomic_path

VERSION = 1  # bump when the drawing (synthetic_faces.py) changes, so that ensure() regenerates stale sets
# Calibration (10-fold accuracy on synth_val.bin): with these defaults raw-pixel cosine gets 0.705,
# PCA+LDA on 32 px 0.98, and a 4-block CNN (16-96 channels, CosFace s=16 m=0.1, SGD) 0.90 after
# 8,000 samples. At difficulty 0.5 that CNN gets 0.85; at 1.0 (rotation sd 7 deg, shift sd 3 px, ...)
# raw pixels get 0.65 and the CNN with s=30 m=0.35 only 0.67 after 8,000 samples: sets for longer runs.
DEFAULTS = dict(num_identities=200, images_per_identity=40, val_identities=100, val_pairs=600,
                difficulty=DIFFICULTY, seed=0, image_format="jpeg")
STAMP = "synthetic.json"

def _encode(image, image_format):
    buf = io.BytesIO()
    options = dict(quality=95) if image_format == "jpeg" else {}
    Image.fromarray(image).save(buf, format=image_format.upper(), **options)
    return buf.getvalue()


def _plan_pairs(val_ids, num_pairs, seed):
    """[(id_a, id_b, issame)]: even positions same, odd different, so every 10-fold block is balanced."""
    r = np.random.default_rng([seed, 3])
    cycle = np.concatenate([r.permutation(val_ids) for _ in range(num_pairs // (2 * len(val_ids)) + 1)])
    pairs = []
    for i in range(num_pairs):
        if i % 2 == 0:
            a = b = int(cycle[i // 2])
        else:
            a, b = (int(v) for v in r.choice(val_ids, 2, replace=False))
        pairs.append((a, b, i % 2 == 0))
    return pairs


def _params(**overrides):
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic-set parameters: {sorted(unknown)}")
    p = {**DEFAULTS, **overrides}
    p = {k: type(DEFAULTS[k])(v) for k, v in p.items()}
    if p["val_pairs"] % 2 or p["val_pairs"] < 2:
        raise ValueError(f"val_pairs must be even and >= 2 (half same, half different), got {p['val_pairs']}")
    if p["val_identities"] < 2 or p["num_identities"] < 1 or p["images_per_identity"] < 1:
        raise ValueError("need >= 1 training identity and image per identity, >= 2 validation identities")
    # the set is RecordIO, whose labels are float32: more identities would merge class ids
    record_index.check_class_count(p["num_identities"], "num_identities")
    if p["image_format"] not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {p['image_format']!r}")
    return p


def generate(out_dir, **params):
    """Write a synthetic set into out_dir (created; existing files overwritten). Returns the summary."""
    p = _params(**params)
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)  # an old stamp must not vouch for files being rewritten
    n_train, per_id, seed = p["num_identities"], p["images_per_identity"], p["seed"]
    train_ids = list(range(n_train))
    val_ids = list(range(n_train, n_train + p["val_identities"]))  # disjoint from training by design
    import mxnet as mx  # heavy import, only needed when writing

    writer = mx.recordio.MXIndexedRecordIO(str(out / "train.idx"), str(out / "train.rec"), "w")
    first_range = n_train * per_id + 1
    writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [first_range, first_range + n_train], 0, 0), b""))
    for label, identity in enumerate(train_ids):
        images = render(identity_params(seed, identity), per_id, np.random.default_rng([seed, 2, identity]),
                        p["difficulty"])
        for j, image in enumerate(images):
            key = 1 + label * per_id + j
            writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), key, 0),
                                                   _encode(image, p["image_format"])))
    for label in range(n_train):  # one range record per class: [first image record, one past last]
        key = first_range + label
        span = [1 + label * per_id, 1 + (label + 1) * per_id]
        writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, span, key, 0), b""))
    writer.close()
    (out / "property").write_text(f"{n_train},{SIZE},{SIZE}\n")

    pairs = _plan_pairs(val_ids, p["val_pairs"], seed)
    slots = {}  # identity -> list of positions in the bins list that show it
    for i, (a, b, _) in enumerate(pairs):
        slots.setdefault(a, []).append(2 * i)
        slots.setdefault(b, []).append(2 * i + 1)
    bins = [None] * (2 * len(pairs))
    for identity in sorted(slots):  # every slot gets its own image: no pair compares an image to itself
        images = render(identity_params(seed, identity), len(slots[identity]),
                        np.random.default_rng([seed, 2, identity]), p["difficulty"])
        for position, image in zip(slots[identity], images):
            bins[position] = _encode(image, p["image_format"])
    write_bin(out / "synth_val.bin", bins, [same for _, _, same in pairs], protocol=4)

    summary = dict(version=VERSION, params=p, num_classes=n_train, num_images=n_train * per_id,
                   train_identity_ids=train_ids, val_identity_ids=val_ids,
                   val_pair_identities=[[a, b] for a, b, _ in pairs])
    # One key per line, lists kept on one line each; written last: its presence marks a complete set.
    (out / STAMP).write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in summary.items())
                             + "\n}\n")
    return dict(summary, seconds=round(time.time() - start, 2))


def _stamp(out):
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None


def ensure(out_dir, force=False, **params):
    """Make out_dir hold the set for these parameters; reuse it when its stamp matches (unless force).

    Generates into a temporary folder next to out_dir and renames it into place, so out_dir never
    holds a half-written set; a lock file serialises ranks that call this at the same time. An
    existing out_dir is replaced only if it is empty or holds a synthetic set (it has a stamp).
    """
    p = _params(**params)
    out = Path(out_dir)
    matches = lambda stamp: stamp is not None and stamp.get("version") == VERSION and stamp.get("params") == p
    if not force and matches(_stamp(out)):  # checked before locking: a finished set may be read-only
        return _stamp(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = _stamp(out)
        if matches(stamp) and not force:  # another process made it while we waited for the lock
            return stamp
        if out.exists() and stamp is None and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a synthetic set (no {STAMP}); not replacing it")
        with atomic_path(out, sync=False) as tmp:  # `.<name>.tmp<pid>`, removed on any error
            os.mkdir(tmp)  # the usual folder mode (umask)
            summary = generate(tmp, **p)
            if out.exists():  # a stale set (other parameters) or an empty folder: move it aside first
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "set")
                shutil.rmtree(old)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the synthetic face-identity set (insightface format).")
    parser.add_argument("--out", required=True, help="output folder (reused if it holds the same set)")
    for key, default in DEFAULTS.items():  # --num-identities (alias --identities), --difficulty, ...
        flags = ["--" + key.replace("_", "-")] + (["--identities"] if key == "num_identities" else [])
        parser.add_argument(*flags, dest=key, type=type(default), default=default, help=f"default {default}")
    parser.add_argument("--force", action="store_true", help="regenerate even if the stamp matches")
    args = vars(parser.parse_args(argv))
    out, force = args.pop("out"), args.pop("force")
    try:
        summary = ensure(out, force=force, **args)
    except (ValueError, FileExistsError) as e:  # parameters refused (or a folder not to replace): one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {summary['num_images']} images of {summary['num_classes']} identities, "
          f"{len(summary['val_pair_identities'])} val pairs of {len(summary['val_identity_ids'])} unseen identities"
          + (f" ({summary['seconds']} s)" if "seconds" in summary else " (already there)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
