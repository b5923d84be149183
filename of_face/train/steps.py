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

from of_face import parallel
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

    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1):
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
        if getattr(head, "sparse_update", False):
            # gather(head.weight) + its optimizer -> indexed_slices_{momentum,adam}_update:
            # only the kept rows and their optimizer state are touched (see heads/partial_fc.py)
            sparse = self.config.proto.indexed_slices_optimizer_conf
            sparse.enable = True
            sparse.include_op_names.op_name.append("head.weight")
        if accum_steps > 1:
            # the batch fed in is accum_steps micro-batches (split per rank along dim 0); OneFlow
            # averages their gradients (the loss / k) and steps optimizer and LR schedule once
            self.config.set_gradient_accumulation_steps(accum_steps)
        if amp is not None and amp.enable:
            self.config.enable_amp(True)
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=amp.init_scale, growth_interval=2000))

    def build(self, images, labels, noise=None):
        objective, loss = self.head.objective(self.backbone(images), labels, noise)
        objective.backward()
        return loss


class EmbedGraph(nn.Graph):
    """Inference: images -> embeddings (backbone in eval mode at compile time)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def build(self, images):
        return self.backbone(images)


class GraphStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1):
        self.graph = TrainGraph(backbone, head, optimizer, scheduler, amp, checkpointing, accum_steps)
        self.head, self.placement = head, head.weight.placement  # all ranks
        self.accum_steps = accum_steps
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)

    def __call__(self, images, labels):
        if self.head.sampling:
            noise = self.head.step_noise(self.steps_done, self.accum_steps)
            loss = self.graph(images, labels, noise)
        else:
            loss = self.graph(images, labels)
        self.steps_done += 1
        return loss.mean() if self.accum_steps > 1 else loss  # one loss per micro-batch

    def loss_scale(self):
        """AMP's current dynamic loss scale on rank 0 (None elsewhere, and without AMP).

        The live scale is a variable of the compiled job, exposed by `nn.Graph.state_dict()` as
        `System-Train-DynamicLossScale-<graph>-LossScale`: one element placed on rank 0 only. It is
        read locally, without communication, so any rank may call this alone.
        """
        if getattr(self.graph, "_grad_scaler", None) is None:
            return None
        for name, value in self.graph.state_dict().items():
            if name.endswith("-LossScale") and not isinstance(value, dict):
                local = value.to_local().numpy().reshape(-1)
                return float(local[0]) if local.size else None
        return None


class EagerStep:
    def __init__(self, backbone, head, optimizer, scheduler, amp=None, checkpointing=False, accum_steps=1):
        if amp is not None and amp.enable:
            raise NotImplementedError("AMP is available in graph mode only (Global.mode=graph)")
        if checkpointing:
            raise NotImplementedError("activation checkpointing is available in graph mode only (Global.mode=graph)")
        self.backbone, self.head = backbone, head
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accum_steps = accum_steps
        self.steps_done = 0  # optimizer steps taken: picks the sampling noise (set on resume)

    def __call__(self, images, labels):
        loss = 0.0
        micro = [self._micro_batches(images), self._micro_batches(labels), [None] * self.accum_steps]
        if self.head.sampling:
            micro[2] = self._micro_batches(self.head.step_noise(self.steps_done, self.accum_steps))
        self.steps_done += 1
        for x, y, noise in zip(*micro):
            objective, micro_loss = self.head.objective(self.backbone(x), y, noise)
            (objective / self.accum_steps).backward()  # gradients add up to the mean over micro-batches
            loss = loss + micro_loss.detach() / self.accum_steps
        if getattr(self.head, "sparse_update", False):
            kept = self.head.sampled_mask(self.head.last_index).unsqueeze(1).to(flow.bool)  # exactly 0/1
            before = self._fc_state()
        for group in self.optimizer.param_groups:  # the graph clips inside its update
            if "clip_grad_max_norm" in group:
                flow.nn.utils.clip_grad_norm_(group.parameters, group["clip_grad_max_norm"], 2.0)
        self.optimizer.step()
        if getattr(self.head, "sparse_update", False):
            self._keep_unsampled_rows(kept, before)
        self.optimizer.zero_grad()
        self.scheduler.step()
        return loss

    def loss_scale(self):
        return None  # no AMP in eager mode

    def _micro_batches(self, t):
        """Each rank's shard cut into accum_steps pieces, as the graph's gradient accumulation does."""
        if self.accum_steps == 1:
            return [t]
        pieces = flow.chunk(t.to_local(), self.accum_steps, dim=0)
        return [p.to_global(placement=t.placement, sbp=t.sbp) for p in pieces]

    def _fc_state(self):
        """The FC weight and its optimizer state tensors (momentum / Adam moments), copied."""
        w = self.head.weight
        state = self.optimizer._state.get(w, {})
        tensors = {k: v for k, v in state.items() if isinstance(v, flow.Tensor) and v.shape == w.shape}
        return {"weight": w.detach().clone(), **{k: v.clone() for k, v in tensors.items()}}

    def _keep_unsampled_rows(self, kept, before):
        """Eager twin of the graph's sparse update: unsampled rows get back weight and state exactly."""
        w = self.head.weight
        state = self.optimizer._state.setdefault(w, {})
        with flow.no_grad():
            w.copy_(flow.where(kept, w, before["weight"]))
            for k, old in before.items():
                if k != "weight":
                    state[k].copy_(flow.where(kept, state[k], old))
            for k, v in state.items():  # state created by this first step: unsampled rows start at 0
                if k not in before and isinstance(v, flow.Tensor) and v.shape == w.shape:
                    v.copy_(flow.where(kept, v, flow.zeros_like(v)))


STEPPERS = {"graph": GraphStep, "eager": EagerStep}
