"""PartialFC sampling (host noise of `step_noise`) inside nn.Graph on 2 ranks, and one eager
loss/gradient with its sample.

argv: out.json. Rank 0 writes the kept indices / remapped labels of many steps, and the data of
one eager step for a numpy reference.
"""
import json
import sys

import numpy as np

import of_face  # noqa: F401
import oneflow as flow
from of_face import parallel
from of_face.heads.partial_fc import PartialFC
from of_face.heads import fc_table

out = sys.argv[1]
CLASSES, DIM, RATE = 21, 8, 0.5  # padded to 22 on 2 ranks: 11 per rank, 1 padded on rank 1
flow.manual_seed(0)
head = PartialFC(CLASSES, DIM, margin=(1.0, 0.0, 0.35), scale=16.0, sample_rate=RATE)


class SampleGraph(flow.nn.Graph):
    def __init__(self):
        super().__init__()
        self.head = head

    def build(self, labels, noise):
        return self.head.sample(parallel.gather(labels), noise)


graph = SampleGraph()
rng = np.random.default_rng(0)
steps = []
for step in range(400):
    # positives: two fixed classes on rank 0 plus one random class, so negatives can be counted
    labels = np.array([0, 1, rng.integers(0, CLASSES), 1], np.int64)
    r = parallel.rank()
    index, remapped = graph(parallel.batch(labels[r * 2:(r + 1) * 2]), head.step_noise(step))
    steps.append({"labels": labels.tolist(), "index": parallel.to_numpy(index).tolist(),
                  "remapped": parallel.to_numpy(remapped).tolist()})

# one eager step with a recorded sample, for the numpy loss/gradient reference
recorded = {}
original = head.sample


def recording_sample(labels, noise=None):
    index, remapped = original(labels, noise)
    recorded["index"], recorded["remapped"] = parallel.to_numpy(index), parallel.to_numpy(remapped)
    return index, remapped


head.sample = recording_sample
weight = np.random.default_rng(1).standard_normal((head.padded_classes, DIM)).astype(np.float32)
head.weight = flow.nn.Parameter(head.table.from_rows(weight))
emb = np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
labels = np.array([3, 15, 20, 10], np.int64)  # 10: position 10 kept, so padded class 21 too
r = parallel.rank()
loss = head(parallel.batch(emb[r * 2:(r + 1) * 2]), parallel.batch(labels[r * 2:(r + 1) * 2]))
loss.backward()
result = {"k": head.num_sample, "local": head.local_classes, "steps": steps,
          "loss": float(parallel.to_numpy(loss)), "weight": weight.tolist(), "emb": emb.tolist(),
          "labels": labels.tolist(), "index": recorded["index"].tolist(), "remapped": recorded["remapped"].tolist(),
          "grad": fc_table.rows(head.weight.grad).tolist()}
if r == 0:
    json.dump(result, open(out, "w"))
