"""Face embeddings straight from a training checkpoint (OneFlow, eager, one process).

Same interface as `OnnxEmbedder`, so every evaluation (verify_bin, evaluate_ijb, the CLIs) can
take a run's output folder instead of an exported ONNX file:

    embed = CheckpointEmbedder("output/glint14")          # backbone.npz + config.yaml
    verify_bin("glint4_val.bin", embed)
"""
import sys

import numpy as np

import of_face  # noqa: F401  (preloads libraries; must precede oneflow)
import oneflow as flow

from of_face.data.loader import normalize


class CheckpointEmbedder:
    """Callable: uint8 RGB batch [n, 112, 112, 3] -> float32 embeddings [n, d].

    `run_dir_or_npz`: a run's output folder (backbone.npz + config.yaml, else its newest ckpt-*),
    a backbone.npz or a ckpt-* training checkpoint (which carries its own config);
    `config`: a config.yaml path, `Config` or `ModelCfg` when it is not next to the checkpoint.
    Pixels get the training normalisation (x / 255 - 0.5) / 0.5; the backbone runs in eval mode
    on local tensors (no nn.Graph, no distributed placement).
    """

    def __init__(self, run_dir_or_npz, config=None, device="cpu", batch_size=64):
        from of_face.export import load_model  # one place that resolves checkpoint + config

        self.model, self.model_cfg, self.path = load_model(run_dir_or_npz, config)
        print(f"embedding with {self.path} ({self.model_cfg.name})", file=sys.stderr)  # which one was picked
        self.device = "cuda" if device == "auto" and flow.cuda.is_available() else (
            "cpu" if device == "auto" else device)
        self.model.to(self.device)
        self.batch_size = int(batch_size)
        self.embedding_size = self.model_cfg.embedding_size

    def __call__(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected uint8 images [n, H, W, 3], got shape {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        outs = []
        self.model.eval()
        with flow.no_grad():
            for s in range(0, len(images), self.batch_size):
                x = normalize(np.ascontiguousarray(images[s:s + self.batch_size].transpose(0, 3, 1, 2)))
                y = self.model(flow.tensor(x, dtype=flow.float32, device=self.device))
                outs.append(y.numpy())
        return np.concatenate(outs).astype(np.float32, copy=False)
