"""class_split_cross_entropy on 2 ranks at 10,000+ classes per rank: loss (graph and eager) and
gradient (eager) of extreme rows, for a float64 numpy comparison.

argv: out.npz. Rank 0 writes the logits, labels, both losses and the gradient.
"""
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.heads.partial_fc import class_split_cross_entropy

out = sys.argv[1]
S = 64.0
world, r = parallel.world_size(), parallel.rank()
C = 10_240 * world  # classes, 10,240 per rank
rng = np.random.default_rng(0)
z = rng.uniform(-S, S, (6, C)).astype(np.float32)
labels = np.array([0, 1, C - 1, 3, C // 2 + 7, 5])
z[1] = S  # every class at the top, the target too: loss log C
z[2] = S  # all 20k others at the top, the target at ArcFace's guarded bottom (on the last rank)
z[2, C - 1] = -1.24 * S
z[3] = -S  # every class at the bottom, the target lower still
z[3, 3] = -1.24 * S
z[4, : C // 2] = -1e4  # the first rank's classes all padded (-1e4 bias); target on the second
z[5] = rng.normal(0, 1, C).astype(np.float32)  # an untrained model's logits

place = parallel.placement("cpu")
cols = slice(r * C // world, (r + 1) * C // world)
local = flow.tensor(z[:, cols], requires_grad=True)
logits = local.to_global(placement=place, sbp=parallel.SBP_LOGITS)
glabels = flow.tensor(labels).to_global(placement=place, sbp=parallel.SBP_GATHERED)

loss = class_split_cross_entropy(logits, glabels)
loss.backward()
grad = parallel.to_numpy(local.grad.unsqueeze(0).to_global(placement=place, sbp=parallel.SBP_BATCH))


class LossGraph(flow.nn.Graph):
    def build(self, x, y):
        return class_split_cross_entropy(x, y)


graph_loss = parallel.to_numpy(LossGraph()(logits.detach(), glabels))
if r == 0:
    grad = np.concatenate(list(grad), axis=1)  # [world, N, C/world] -> [N, C]
    np.savez(out, z=z, labels=labels, eager=parallel.to_numpy(loss), graph=graph_loss, grad=grad)
