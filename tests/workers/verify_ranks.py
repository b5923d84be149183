"""Verification embeddings of one backbone whose BatchNorm statistics differ across ranks.

argv: out.json mode [stats_of_rank]. Every rank's running statistics are drawn from a generator
seeded with its rank (or with `stats_of_rank` on every rank), as two ranks' own samples would
leave them. Rank 0 writes Verifier.embed's embeddings of fixed images; every rank checks that its
own statistics are back afterwards.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.config import load_config
from of_face.models import build_backbone
from of_face.train.verify import Verifier

out, mode = sys.argv[1], sys.argv[2]
stats_rank = int(sys.argv[3]) if len(sys.argv) > 3 else parallel.rank()
cfg = load_config(None, [f"Global.mode={mode}", "Global.seed=1", "Model.name=iresnet", "Model.layers=[1, 1, 1, 1]",
                         "Model.width=4", "Model.embedding_size=8", "Data.batch_size=3", "Data.val_targets=[]"])
flow.manual_seed(1)
backbone = build_backbone(cfg.Model)
flow._oneflow_internal.eager.Sync()
backbone = parallel.broadcast_module(backbone)
rng = np.random.default_rng(100 + stats_rank)
own = {}
for name, b in backbone.named_buffers():
    if name.endswith("running_mean") or name.endswith("running_var"):
        low, high = (0.5, 2.0) if name.endswith("running_var") else (-0.3, 0.3)
        value = rng.uniform(low, high, tuple(b.shape)).astype(np.float32)
        b.to_local().copy_(flow.tensor(value))
        own[name] = value
assert own, "the backbone has no BatchNorm statistics"
images = np.random.default_rng(7).integers(0, 256, (10, 112, 112, 3), dtype=np.uint8)
emb = Verifier(cfg, backbone).embed(images)
for name, b in backbone.named_buffers():  # training goes on with this rank's own statistics
    if name in own and not np.array_equal(b.to_local().numpy(), own[name]):
        raise SystemExit(f"rank {parallel.rank()}: {name} not restored after verification")
if parallel.rank() == 0:
    json.dump({"emb": emb.tolist(), "world": parallel.world_size()}, open(out, "w"))
