"""Verification during training: 10-fold accuracy with flip test on each configured `.bin`.

Every rank embeds only its share of each batch (inputs split along the batch), so the work is
sharded across ranks, not repeated; the embeddings are then gathered for the fold protocol.

The model verified is the one that is saved: BatchNorm running statistics differ across ranks
(each rank updates them from its own samples), and backbone.npz, the checkpoints' backbone and
the exports hold rank 0's. Every rank therefore embeds with rank 0's statistics
(`parallel.rank0_replicas`; its own come back afterwards, so training is unchanged), and the
accuracy is that of backbone.npz, the same for any number of ranks.
"""
import os

import numpy as np
import oneflow as flow

from of_face import parallel
from of_face.config import ConfigError
from of_face.data.loader import normalize
from of_face.data.verification_bin import load_bin
from of_face.scoring import evaluate, flip_embed
from of_face.models.embed_graph import EmbedGraph


NFOLDS = 10  # insightface's verification protocol


class Verifier:
    def __init__(self, cfg, backbone):
        self.backbone = backbone
        self.device = cfg.Global.device
        self.graph_mode = cfg.Global.mode == "graph"
        self.per_rank = cfg.Data.batch_size
        self.targets = []
        for name in cfg.Data.val_targets:
            path = os.path.join(cfg.Data.root, f"{name}.bin")
            if not os.path.isfile(path) and cfg.Data.dataset != "synthetic":
                raise ConfigError(f"Data.val_targets: {path} not found")
            self.targets.append((name, path))
        self._sets = {}
        # read and decode every set now: a bad .bin stops the run before training, not after it
        for name, path in self.targets:
            try:
                self._sets[name] = load_bin(path)
            except FileNotFoundError:
                raise ConfigError(f"Data.val_targets: {path} not found") from None
            except ValueError as e:
                raise ConfigError(f"Data.val_targets: {e}") from None
            pairs = len(self._sets[name][1])
            if pairs < NFOLDS:  # the 10-fold protocol: refused now, not at the first verification
                raise ConfigError(f"Data.val_targets: {path}: {pairs} pairs; the {NFOLDS}-fold protocol needs "
                                  f"at least {NFOLDS}")
        self._graph = None

    def embed(self, images_uint8):
        """Embeddings of every image (all ranks call this with the same images)."""
        world, rank, b = parallel.world_size(), parallel.rank(), self.per_rank
        chunk = b * world
        n = len(images_uint8)
        padded = int(np.ceil(n / chunk) * chunk)
        if padded > n:  # static shapes for the graph: pad with copies, drop their embeddings
            pad = np.repeat(images_uint8[-1:], padded - n, axis=0)
            images_uint8 = np.concatenate([images_uint8, pad])
        out = []
        self.backbone.eval()
        with flow.no_grad(), parallel.rank0_replicas(list(self.backbone.buffers())):
            for start in range(0, padded, chunk):
                shard = normalize(images_uint8[start + rank * b : start + (rank + 1) * b].transpose(0, 3, 1, 2))
                x = parallel.batch(shard, device=self.device)
                if self.graph_mode:
                    if self._graph is None:
                        self._graph = EmbedGraph(self.backbone)
                    y = self._graph(x)
                else:
                    y = self.backbone(x)
                out.append(parallel.to_numpy(y))
        self.backbone.train()
        return np.concatenate(out)[:n]

    def run(self):
        results = {}
        for name, path in self.targets:
            if name not in self._sets:
                self._sets[name] = load_bin(path)
            images, issame = self._sets[name]
            plain, flipped = flip_embed(self.embed, images, batch_size=len(images), return_parts=True)
            r = evaluate(plain + flipped, issame, nfolds=NFOLDS)
            # XNorm as insightface logs it: the mean norm of the single (not flip-summed) embeddings,
            # as eval/verification.py reports it (`xnorm_single` there)
            single = np.linalg.norm(np.concatenate([plain, flipped]).astype(np.float64), axis=1)
            r.update(pairs=len(issame), xnorm=float(single.mean()))
            results[name] = r
        return results
