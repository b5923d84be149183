"""One graph-mode SGD step per backbone family (tiny sizes) on global tensors; report what changed.

argv: out.json. Backbone broadcast over the ranks, batch split along dim 0, loss = MSE to fixed
random targets (a plain mean of the BN-normalised embedding would have ~zero gradient).
Rank 0 writes {family: {"loss", "changed", "trainable", "rank_diff", "masked", "distinct_masks"}}.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.config import ModelCfg
from of_face.models import build_backbone

EMB, GLOBAL_BATCH = 32, 8
CFGS = {
    "iresnet": ModelCfg(name="iresnet", layers=[1, 1, 1, 1], width=4, embedding_size=EMB),
    "mbf": ModelCfg(name="mbf", layers=[1, 1, 1, 1], width=8, embedding_size=EMB),
    "vit": ModelCfg(name="vit_t", vit_dim=16, vit_depth=2, mask_ratio=0.25, drop_path_rate=0.1, embedding_size=EMB),
}


class StepGraph(flow.nn.Graph):
    """forward -> MSE -> backward -> SGD, compiled; also returns FaceViT's token mask."""

    def __init__(self, backbone, optimizer, with_mask, amp=False):
        super().__init__()
        self.backbone, self.with_mask = backbone, with_mask
        self.add_optimizer(optimizer)
        if amp:  # mixed precision inside the graph, with a dynamic loss scale
            self.config.enable_amp(True)
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=128.0, growth_interval=2000))

    def build(self, images, targets):
        if self.with_mask:
            emb, mask = self.backbone.forward_with_mask(images)
        else:
            emb, mask = self.backbone(images), None
        loss = flow.mean(flow.square(emb - targets))
        loss.backward()
        return (loss, mask) if self.with_mask else loss


def local_shard(array):
    per_rank, r = GLOBAL_BATCH // parallel.world_size(), parallel.rank()
    return parallel.batch(array[r * per_rank:(r + 1) * per_rank])


def params_flat(model):
    """This rank's own copy of every parameter (to_local of a broadcast tensor: no communication)."""
    return np.concatenate([p.to_local().numpy().ravel() for p in model.parameters()])


def run(cfg, rng, amp=False):
    flow.manual_seed(0)
    model = parallel.broadcast_module(build_backbone(cfg))
    model.train()
    with_mask = hasattr(model, "forward_with_mask")
    graph = StepGraph(model, flow.optim.SGD(model.parameters(), lr=0.1), with_mask, amp)
    # .copy(): numpy() of a broadcast parameter can share its memory, which the step updates
    before = [parallel.to_numpy(p).copy() for p in model.parameters()]
    images = rng.standard_normal((GLOBAL_BATCH, 3, 112, 112)).astype(np.float32)
    targets = rng.standard_normal((GLOBAL_BATCH, EMB)).astype(np.float32)
    out = graph(local_shard(images), local_shard(targets))
    loss, mask = out if with_mask else (out, None)
    after = [parallel.to_numpy(p) for p in model.parameters()]
    # Each rank's own parameter copy, stacked as a [ranks, P] global tensor: rows must be equal.
    per_rank = parallel.to_numpy(parallel.batch(params_flat(model)[None]))
    result = {
        "loss": float(parallel.to_numpy(loss)),
        "trainable": sum(p.requires_grad for p in model.parameters()),
        "changed": sum(bool(np.any(a != b)) for a, b in zip(after, before)),
        "rank_diff": float(np.abs(per_rank - per_rank[0]).max()),
    }
    if mask is not None:
        m = parallel.to_numpy(mask).astype(bool)  # [GLOBAL_BATCH, 144], samples of both ranks
        result["masked"] = m.sum(1).tolist()
        result["distinct_masks"] = len({row.tobytes() for row in m})
    return result


if __name__ == "__main__":
    rng = np.random.default_rng(0)  # same stream on every rank: each takes its own slice
    results = {family: run(cfg, rng) for family, cfg in CFGS.items()}
    results.update({f"{family}+amp": run(cfg, rng, amp=True) for family, cfg in CFGS.items()})
    if parallel.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
