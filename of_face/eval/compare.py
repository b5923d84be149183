"""`of-face embed`, `of-face compare` and `of-face verify`: face embeddings of image files.

    of-face embed IMG... (--model X.onnx | --checkpoint RUN) [--landmarks FILE] [--out emb.npy]
    of-face compare A B (--model X.onnx | --checkpoint RUN) [--landmarks FILE]
                    [--threshold T | --calibrate-bin X.bin]
    of-face verify --bin X.bin [--bin Y.bin] (--model X.onnx | --checkpoint RUN)

Images: 112x112 crops already aligned to the ArcFace template are used as they are; with
`--landmarks FILE` (one line per image: `name x1 y1 ... x5 y5`, an optional 12th field such as
IJB's faceness score is ignored; `name` is the path as given or its file name) each listed image
is first aligned with `of_face.eval.align.align_face`. The embedding of an image is the model's
output for it plus that for its horizontal flip, L2-normalised (the verification protocol).

`compare` prints the cosine of the two embeddings and calls `same` when cosine >= threshold.
The threshold is `--threshold`, else the best-accuracy cosine threshold over the pairs of the
`--calibrate-bin` verification set (embedded with the same model), else DEFAULT_THRESHOLD.

Models (`of_face.eval.embedders`, the same flags for every evaluation command): `--model` is an
ONNX file (pixels normalised as (x - mean) / std, default 127.5/127.5, raw pixels for an export
with baked normalisation; the shared MobileFaceNet wants `--std 128`); `--checkpoint` is a
training run's output folder (or its backbone.npz, with `-c/--config`), run with OneFlow and the
training normalisation.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from of_face.data.verification_bin import load_bin
from of_face.eval.embedders import add_model_args, embedder_from_args, one_line_errors
from of_face.eval.verification import verify_bin
from of_face.io import atomic_write, check_output
from of_face.scoring import flip_embed, l2_normalize

# Cosine threshold used when neither --threshold nor --calibrate-bin is given. It is the midpoint
# of the best 10-fold thresholds of the shared MobileFaceNet on glint4_val.bin (squared L2
# distance 1.41..1.48 between flip-summed unit embeddings, i.e. cosine = 1 - d / 2 = 0.26..0.295).
# It is model-dependent: calibrate with --calibrate-bin for any other model.
DEFAULT_THRESHOLD = 0.28
# sha256 of that model file (../shared/models/mobilefacenet_192d.onnx): the one model the default fits
CALIBRATION_MODEL_SHA256 = "9160c10221d1262f866b70bd27db1129f804cf529459dee9a00658ca730c039e"
# a face crop's pixels spread over tens of grey levels; below this the image is (nearly) one colour
FLAT_IMAGE_STD = 2.0
ALIGNED_SIZE = 112


# --------------------------------------------------------------------------- images


def read_landmarks(path):
    """{name: (5, 2) float array} from lines `name x1 y1 ... x5 y5 [score]`."""
    table = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (11, 12):
            raise ValueError(f"{path}: line {i + 1}: expected `name x1 y1 ... x5 y5`, got {len(fields)} fields")
        try:
            table[fields[0]] = np.array(fields[1:11], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise ValueError(f"{path}: line {i + 1}: landmark coordinates are not numbers") from None
    return table


def load_face(path, landmarks=None):
    """One image file -> aligned uint8 RGB [112, 112, 3] (aligned with its landmarks if listed)."""
    from of_face.eval.align import align_face

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    if landmarks is not None:
        key = next((k for k in (str(path), os.path.basename(str(path))) if k in landmarks), None)
        if key is not None:
            return align_face(rgb, landmarks[key], size=ALIGNED_SIZE)
    if rgb.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        hint = "it is not listed in --landmarks" if landmarks is not None else "pass --landmarks to align it"
        raise ValueError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} is not an aligned 112x112 crop ({hint})")
    return rgb


def unit_embeddings(embed_fn, images):
    """Flip-summed, L2-normalised embeddings of uint8 RGB images [n, 112, 112, 3] -> float32 [n, d]."""
    images = np.asarray(images)
    feats = flip_embed(embed_fn, images, batch_size=max(len(images), 1), dedupe=False, dtype=np.float64)
    return l2_normalize(feats).astype(np.float32)


def embed_files(paths, embed_fn, landmarks=None, batch_size=64):
    faces = np.stack([load_face(p, landmarks) for p in paths])
    return np.concatenate([unit_embeddings(embed_fn, faces[s:s + batch_size])
                           for s in range(0, len(faces), batch_size)])


# --------------------------------------------------------------------------- thresholds


def best_cosine_threshold(cosines, issame):
    """(threshold, accuracy): the cosine threshold (same if cosine >= t) of best pair accuracy.

    Candidates are the midpoints between consecutive distinct cosines (plus one below the lowest
    and one above the highest); among equally accurate candidates the middle one is taken.
    """
    cos = np.asarray(cosines, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=np.bool_).reshape(-1)
    if len(cos) != len(same) or len(cos) == 0:
        raise ValueError(f"need one label per cosine, got {len(cos)} cosines and {len(same)} labels")
    values = np.unique(cos)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    s_sorted, d_sorted = np.sort(cos[same]), np.sort(cos[~same])
    true_accepts = len(s_sorted) - np.searchsorted(s_sorted, candidates, side="left")  # cos >= t
    true_rejects = np.searchsorted(d_sorted, candidates, side="left")  # cos < t
    acc = (true_accepts + true_rejects) / len(cos)
    best = np.flatnonzero(acc == acc.max())
    return float(candidates[best[len(best) // 2]]), float(acc.max())


def calibrate_on_bin(path, embed_fn, batch_size=64):
    """Best-accuracy cosine threshold over all pairs of a verification .bin: (t, accuracy, pairs)."""
    images, issame = load_bin(path)
    emb = l2_normalize(flip_embed(embed_fn, images, batch_size=batch_size).astype(np.float64))
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    t, acc = best_cosine_threshold(cos, issame)
    return t, acc, len(issame)


# --------------------------------------------------------------------------- commands


def _is_calibration_model(args) -> bool:
    """Whether the model is the one DEFAULT_THRESHOLD was calibrated on (same file, same --std)."""
    import hashlib

    model = getattr(args, "model", None)
    if getattr(args, "checkpoint", None) or not model or (args.std not in (None, 128.0)):
        return False
    with open(model, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == CALIBRATION_MODEL_SHA256


def names_path(out_npy):
    out = Path(out_npy)
    return out.with_name(out.name[:-4] + ".names.txt" if out.name.endswith(".npy") else out.name + ".names.txt")


@one_line_errors
def embed_main(argv=None):
    ap = argparse.ArgumentParser(prog="of-face embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files (aligned 112x112 crops, or listed in --landmarks)")
    add_model_args(ap)
    ap.add_argument("--landmarks", default=None, help="file of `name x1 y1 ... x5 y5` lines")
    ap.add_argument("--out", default=None,
                    help="write embeddings [n, d] float32 here (.npy) and the image names to <out>.names.txt; "
                         "without it the cosine matrix is printed")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    out = None
    if args.out:  # an unwritable output is found before the model runs
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        check_output(out, "--out", ".npy file")
    landmarks = read_landmarks(args.landmarks) if args.landmarks else None
    emb = embed_files(args.images, embedder_from_args(args), landmarks, args.batch_size)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            np.save(f, emb)
        with atomic_write(names_path(out)) as f:
            f.write("".join(f"{p}\n" for p in args.images).encode())
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} (names: {names_path(out)})")
    else:
        cos = emb @ emb.T
        for name, row in zip(args.images, cos):
            print(f"{name}\t" + " ".join(f"{v:.4f}" for v in row))
    return 0


@one_line_errors
def compare_main(argv=None):
    ap = argparse.ArgumentParser(prog="of-face compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="first image")
    ap.add_argument("b", help="second image")
    add_model_args(ap)
    ap.add_argument("--landmarks", default=None, help="file of `name x1 y1 ... x5 y5` lines")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, default=None, help="cosine threshold: same if cosine >= T")
    how.add_argument("--calibrate-bin", default=None,
                     help="verification .bin: use the best-accuracy cosine threshold over its pairs")
    args = ap.parse_args(argv)
    landmarks = read_landmarks(args.landmarks) if args.landmarks else None
    embed = embedder_from_args(args)
    faces = np.stack([load_face(p, landmarks) for p in (args.a, args.b)])
    for path, face in zip((args.a, args.b), faces):
        spread = float(face.reshape(-1, face.shape[-1]).astype(np.float64).std(axis=0).max())  # over pixels
        if spread < FLAT_IMAGE_STD:
            print(f"warning: {path}: almost no variation (pixel std {spread:.2f} grey levels): not a face? "
                  "the decision below means nothing for it", file=sys.stderr)
    emb = unit_embeddings(embed, faces)
    if args.threshold is not None:
        threshold, source = args.threshold, "given"
    elif args.calibrate_bin:
        threshold, acc, pairs = calibrate_on_bin(args.calibrate_bin, embed)
        source = f"calibrated on {args.calibrate_bin}: accuracy {acc:.4f} over {pairs} pairs"
    else:
        threshold, source = DEFAULT_THRESHOLD, "default; calibrate with --calibrate-bin for your model"
        if not _is_calibration_model(args):
            print(f"warning: the default threshold {DEFAULT_THRESHOLD} was calibrated for the shared "
                  "MobileFaceNet (mobilefacenet_192d.onnx), not this model: the decision may be wrong; "
                  "pass --calibrate-bin X.bin (pairs of your data) or --threshold T", file=sys.stderr)
    cosine = float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64)))
    print(f"cosine: {cosine:.6f}")
    print(f"threshold: {threshold:.6f} ({source})")
    print(f"decision: {'same' if cosine >= threshold else 'different'}")
    return 0


@one_line_errors
def verify_main(argv=None, prog="of-face verify"):
    """1:1 verification accuracy on .bin files (insightface protocol), ONNX model or checkpoint."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="10-fold verification accuracy on insightface .bin pair files.\n\n"
                    "    of-face verify (--model X.onnx | --checkpoint RUN) --bin lfw.bin [--bin cfp_fp.bin]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--bin", action="append", required=True, help="a .bin file (repeatable)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    embed = embedder_from_args(args)
    for path in args.bin:
        r = verify_bin(path, embed, batch_size=args.batch_size)
        # XNorm as insightface logs it: mean norm of single (not flip-summed) embeddings.
        print(f"{Path(path).stem}: {r['accuracy']:.4f} ± {r['std']:.4f}, XNorm {r['xnorm_single']:.2f}, "
              f"VAL@FAR=1e-3 {r['val']:.4f} ± {r['val_std']:.4f} (FAR {r['far']:.4f}), {r['pairs']} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
