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
from typing import Callable, Optional

import numpy as np

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
    if checkpoint is not None:
        from of_face.eval.checkpoint_embedder import CheckpointEmbedder

        return CheckpointEmbedder(checkpoint, config=config, device=device, batch_size=batch_size)
    from of_face.eval.onnx_embedder import OnnxEmbedder

    embed = OnnxEmbedder(model, mean=DEFAULT_MEAN, std=DEFAULT_STD, threads=threads)
    # `of_face.export --bake-normalization` records that the model takes raw pixels.
    meta = embed.session.get_modelmeta().custom_metadata_map
    if meta.get("normalization", "").startswith("inside"):
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
                    help="ONNX only: pixel mean (default 127.5; 0 for an of_face export with baked normalisation)")
    ap.add_argument("--std", type=float, default=None,
                    help="ONNX only: pixel std (default 127.5; 1 for an of_face export with baked normalisation)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX only: onnxruntime intra-op threads")


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """make_embedder from parsed `add_model_args` flags (missing attributes count as not given)."""
    checkpoint = getattr(args, "checkpoint", None) or None
    model = None if checkpoint else getattr(args, "model", None)
    return make_embedder(model, checkpoint, config=getattr(args, "config", None), mean=getattr(args, "mean", None),
                         std=getattr(args, "std", None), threads=getattr(args, "threads", None))
