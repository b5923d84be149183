"""One training step, two ways: compiled (`nn.Graph`) or eager. Same modules, same tensors.

Both take a global batch (images, labels split along the batch) and return the global mean
loss; the trainer loop above them does not know which one it drives.
"""
import oneflow as flow
import oneflow.nn as nn


class TrainGraph(nn.Graph):
    """backbone -> head -> loss -> backward -> optimizer + LR schedule, compiled as one job."""

    def __init__(self, backbone, head, optimizer, scheduler, amp=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
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
    def __init__(self, backbone, head, optimizer, scheduler, amp=None):
        self.graph = TrainGraph(backbone, head, optimizer, scheduler, amp)

    def __call__(self, images, labels):
        return self.graph(images, labels)


class EagerStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None):
        if amp is not None and amp.enable:
            raise NotImplementedError("AMP is available in graph mode only (Global.mode=graph)")
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
