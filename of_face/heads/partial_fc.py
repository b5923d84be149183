"""The classification head: a class-split FC layer, combined margin, softmax cross-entropy.

The FC weight [classes, dim] is one global tensor split along classes, so each rank stores and
updates only its slice; embeddings are all-gathered, and the logits come out split along
classes. Softmax cross-entropy over those class-split logits is OneFlow's
`sparse_softmax_cross_entropy`, which reduces the max and the sum across ranks itself.

Classes are padded to a multiple of the world size; padded centres get a -1e4 logit bias, so
their softmax probability underflows to exactly 0: they never change the loss and never get
a gradient from it.
"""
import numpy as np
import oneflow as flow
import oneflow.nn as nn
import oneflow.nn.functional as F

from of_face import parallel
from of_face.heads.margin import CombinedMargin

PAD_LOGIT = -1e4


class PartialFC(nn.Module):
    def __init__(self, num_classes, embedding_size, margin=(1.0, 0.5, 0.0), scale=64.0,
                 sample_rate=1.0, device="auto", init_std=0.01):
        super().__init__()
        if sample_rate != 1.0:
            raise NotImplementedError("Loss.sample_rate < 1 (PartialFC sampling) is not available yet")
        self.num_classes = num_classes
        self.padded_classes = parallel.padded_classes(num_classes)
        self.weight = nn.Parameter(
            parallel.fc_weight_random(self.padded_classes, embedding_size, init_std, device)
        )
        self.margin = CombinedMargin(*margin, scale=scale)
        self.pad_bias = None
        if self.padded_classes > num_classes:
            bias = np.zeros(self.padded_classes, np.float32)
            bias[num_classes:] = PAD_LOGIT
            self.pad_bias = parallel.fc_weight(bias, device)

    def logits(self, embeddings, labels):
        """embeddings [N, D] split(0) -> (logits [N, C] split(1), labels [N] broadcast)."""
        embeddings = parallel.gather(embeddings)
        labels = parallel.gather(labels)
        cosine = flow.matmul(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1), transpose_b=True)
        logits = self.margin(cosine.clamp(-1.0, 1.0), labels)
        if self.pad_bias is not None:
            logits = logits + self.pad_bias
        return logits, labels

    def forward(self, embeddings, labels):
        """Mean softmax cross-entropy over the global batch (a scalar global tensor)."""
        logits, labels = self.logits(embeddings, labels)
        return flow._C.sparse_softmax_cross_entropy(logits, labels).mean()
