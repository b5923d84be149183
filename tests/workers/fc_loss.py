"""Loss of the class-split head on a fixed batch and weight (run under the launcher)."""
import json
import sys

import numpy as np

import of_face  # noqa: F401  (loads cuDNN/cuBLAS before OneFlow)
import oneflow as flow
from of_face import parallel
from of_face.heads.partial_fc import PartialFC
from of_face.heads import fc_table

out, margin = sys.argv[1], [float(m) for m in sys.argv[2].split(",")]
classes, dim, batch = 13, 16, 8  # 13 classes: padded to 14 on 2 ranks
rng = np.random.default_rng(0)
weight = rng.standard_normal((classes, dim)).astype(np.float32)
emb = rng.standard_normal((batch, dim)).astype(np.float32)
labels = rng.integers(0, classes, batch).astype(np.int64)

head = PartialFC(classes, dim, margin=margin, scale=32.0)
padded = np.zeros((head.padded_classes, dim), np.float32)
padded[:classes] = weight
padded[classes:] = 1.0  # would change the loss if padded centres were not masked
head.weight = flow.nn.Parameter(head.table.from_rows(padded))

per_rank = batch // parallel.world_size()
r = parallel.rank()
x = parallel.batch(emb[r * per_rank:(r + 1) * per_rank])
y = parallel.batch(labels[r * per_rank:(r + 1) * per_rank])
x.requires_grad = True
loss = head(x, y)
loss.backward()
result = {
    "loss": float(parallel.to_numpy(loss)),
    "world": parallel.world_size(),
    "logits_sbp": str(head.logits(x, y)[0].sbp),
    "weight_grad": fc_table.rows(head.weight.grad)[:classes].tolist(),
    "pad_grad_max": float(np.abs(fc_table.rows(head.weight.grad)[classes:]).max(initial=0.0)),
}
if r == 0:
    json.dump(result, open(out, "w"))
