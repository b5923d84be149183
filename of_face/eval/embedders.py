"""The one place that turns "a model" into an embedder: an ONNX file or a training checkpoint.

    embed = make_embedder(model="model.onnx")                 # onnxruntime, CPU
    embed = make_embedder(checkpoint="output/glint14")        # OneFlow, eager, eval mode
    feats = embed(uint8_rgb_images)                           # [n, 112, 112, 3] -> float32 [n, d]

Every evaluation command (`of-face embed/compare/verify/ijbc`, eval/*.py) selects its model
through `add_model_args` + `embedder_from_args`, so the same flags mean the same thing
everywhere:

  --model X.onnx (alias --model-root, insightface's name): pixels normalised as (x - mean) / std.
      Default 127.5 / 127.5, except for an of_face export made with --bake-normalization, whose
      metadata says the model takes raw pixels (mean 0, std 1). --mean / --std override either
      (the shared MobileFaceNet wants --std 128).
  --checkpoint RUN: a run folder (backbone.npz + config.yaml, else its newest ckpt-*), a
      backbone.npz (-c/--config CONFIG when the config.yaml is not next to it) or a ckpt-*
      training checkpoint (its stored config); training normalisation. The one used is printed.
"""
import argparse
import os
from typing import Callable, Optional

import numpy as np

from of_face.errors import one_line_errors  # noqa: F401  (re-exported: the commands' one error line)

Embedder = Callable[[np.ndarray], np.ndarray]
DEFAULT_MEAN = DEFAULT_STD = 127.5


def make_embedder(model: Optional[str] = None, checkpoint: Optional[str] = None, *, config=None,
                  mean: Optional[float] = None, std: Optional[float] = None, threads: Optional[int] = None,
                  device: str = "cpu", batch_size: int = 64) -> Embedder:
    """An embed_fn (uint8 RGB [n, 112, 112, 3] -> float32 [n, d]) from exactly one of `model` (ONNX
    file; mean/std None = 127.5, or 0/1 for a baked-normalisation export; threads = onnxruntime
    intra-op threads) or `checkpoint` (run folder or backbone.npz; `config` a config.yaml path,
    Config or ModelCfg when it is not next to the checkpoint; device, batch_size for OneFlow)."""
    if (model is None) == (checkpoint is None):
        raise ValueError("give exactly one of model (an ONNX file) or checkpoint (a run folder or backbone.npz)")
    path = checkpoint if checkpoint is not None else model
    if not os.path.exists(path):
        what = "--checkpoint: run folder or backbone.npz" if checkpoint is not None else "--model: ONNX file"
        raise FileNotFoundError(f"{path}: not found ({what})")
    if checkpoint is not None:
        from of_face.device import check_device
        from of_face.eval.checkpoint_embedder import CheckpointEmbedder

        device = check_device(device)  # no GPU, or one OneFlow 0.9 has no kernels for: one message
        return CheckpointEmbedder(checkpoint, config=config, device=device, batch_size=batch_size)
    from of_face.eval.onnx_embedder import OnnxEmbedder

    try:
        embed = OnnxEmbedder(model, mean=DEFAULT_MEAN, std=DEFAULT_STD, threads=threads, device=device)
    except ValueError:  # --device cuda without the CUDA provider: already one line
        raise
    except Exception as e:  # onnxruntime's load errors (InvalidProtobuf, Fail, ...) share no base class
        raise ValueError(f"{model}: not a loadable ONNX model ({str(e).splitlines()[0][-200:]})") from None
    # of_face exports record their normalisation (export.py): "mean"/"std", and the older
    # `--bake-normalization` marker (raw pixels in)
    meta = embed.session.get_modelmeta().custom_metadata_map
    if "mean" in meta and "std" in meta:
        embed.mean, embed.std = float(meta["mean"]), float(meta["std"])
    elif meta.get("normalization", "").startswith("inside"):
        embed.mean, embed.std = 0.0, 1.0
    if mean is not None:
        embed.mean = float(mean)
    if std is not None:
        embed.std = float(std)
    return embed


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model/--model-root | --checkpoint (one required), -c/--config, --mean, --std, --threads."""
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", "--model-root", dest="model", help="ONNX model file")
    group.add_argument("--checkpoint", help="training run folder (its backbone.npz, else newest ckpt-*), backbone.npz "
                       "or a ckpt-* checkpoint")
    ap.add_argument("-c", "--config", default=None, help="with --checkpoint: config.yaml if not next to it")
    ap.add_argument("--mean", type=float, default=None,
                    help="ONNX only: pixels go in as (x - mean) / std. Default: what an of_face export's metadata "
                         "says (127.5, or 0 with baked normalisation), else 127.5")
    ap.add_argument("--std", type=float, default=None,
                    help="ONNX only: default from an of_face export's metadata, else 127.5 (insightface's "
                         "arcface models); a model trained with another one needs it, e.g. 128 for the shared "
                         "MobileFaceNet: a wrong value lowers accuracy without any error")
    ap.add_argument("--threads", type=int, default=None, help="ONNX only: onnxruntime intra-op threads")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: onnxruntime's CUDA provider (needs onnxruntime-gpu) or OneFlow on the GPU")


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """make_embedder from parsed `add_model_args` flags (missing attributes count as not given)."""
    checkpoint = getattr(args, "checkpoint", None) or None
    model = None if checkpoint else getattr(args, "model", None)
    return make_embedder(model, checkpoint, config=getattr(args, "config", None), mean=getattr(args, "mean", None),
                         std=getattr(args, "std", None), threads=getattr(args, "threads", None),
                         device=getattr(args, "device", "cpu"))
