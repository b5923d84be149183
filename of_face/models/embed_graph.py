"""A backbone compiled for inference: what export (ONNX is converted from this graph) and the
in-training verification run."""
import oneflow as flow
import oneflow.nn as nn


class EmbedGraph(nn.Graph):
    """Inference: images -> embeddings (backbone in eval mode at compile time)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def build(self, images: flow.Tensor) -> flow.Tensor:
        return self.backbone(images)
