"""One training step, two ways: compiled (`nn.Graph`) or eager. Same modules, same tensors.

Both take a global batch (images, labels split along the batch) and return the global mean
loss; the trainer loop above them does not know which one it drives.

Activation checkpointing (`checkpointing=True`, graph mode only): every residual / transformer
block of the backbone (`CHECKPOINT_BLOCKS`) is marked with OneFlow 0.9's per-module switch
`proxy.to(GraphModule).activation_checkpointing = True`. OneFlow then keeps only each block's
input for backward and recomputes the block's forward ops there (its compiled job gains ops
named `Sys-Checkpointing-Fake-Fw-Op_*`): less activation memory for one extra forward pass.
"""
import oneflow as flow
import oneflow.nn as nn
from oneflow.nn.graph import GraphModule

from of_face.models.face_vit import Block as ViTBlock
from of_face.models.iresnet import IBasicBlock
from of_face.models.mobilefacenet import Bottleneck

# The modules recomputed in backward: IResNet basic blocks, FaceViT transformer blocks,
# MobileFaceNet bottlenecks that carry a residual add (the stride-1 stacks).
CHECKPOINT_BLOCKS = (IBasicBlock, ViTBlock, Bottleneck)


def checkpoint_block_names(backbone):
    """Dotted names of the backbone's blocks that activation checkpointing marks."""
    return [name for name, m in backbone.named_modules()
            if isinstance(m, CHECKPOINT_BLOCKS) and (not isinstance(m, Bottleneck) or m.residual)]


class TrainGraph(nn.Graph):
    """backbone -> head -> loss -> backward -> optimizer + LR schedule, compiled as one job."""

    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.checkpointed_blocks = checkpoint_block_names(backbone) if checkpointing else []
        if checkpointing and not self.checkpointed_blocks:
            raise ValueError(f"activation checkpointing: {type(backbone).__name__} has no block to checkpoint")
        for name in self.checkpointed_blocks:
            proxy = self.backbone
            for part in name.split("."):
                proxy = getattr(proxy, part)
            proxy.to(GraphModule).activation_checkpointing = True
        self.add_optimizer(optimizer, lr_sch=scheduler)
        if amp is not None and amp.enable:
            self.config.enable_amp(True)
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=amp.init_scale, growth_interval=2000))

    def build(self, images, labels):
        loss = self.head(self.backbone(images), labels)
        loss.backward()
        return loss


class EmbedGraph(nn.Graph):
    """Inference: images -> embeddings (backbone in eval mode at compile time)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def build(self, images):
        return self.backbone(images)


class GraphStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False):
        self.graph = TrainGraph(backbone, head, optimizer, scheduler, amp, checkpointing=checkpointing)

    def __call__(self, images, labels):
        return self.graph(images, labels)


class EagerStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False):
        if amp is not None and amp.enable:
            raise NotImplementedError("AMP is available in graph mode only (Global.mode=graph)")
        if checkpointing:
            raise NotImplementedError("activation checkpointing is available in graph mode only (Global.mode=graph)")
        self.backbone, self.head = backbone, head
        self.optimizer, self.scheduler = optimizer, scheduler

    def __call__(self, images, labels):
        loss = self.head(self.backbone(images), labels)
        loss.backward()
        for group in self.optimizer.param_groups:  # the graph clips inside its update
            if "clip_grad_max_norm" in group:
                flow.nn.utils.clip_grad_norm_(group.parameters, group["clip_grad_max_norm"], 2.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        return loss


STEPPERS = {"graph": GraphStep, "eager": EagerStep}
