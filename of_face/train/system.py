"""One build path: `build(cfg, num_classes, steps_per_epoch) -> TrainingSystem`.

The trainer, the bench scripts and the test workers all wire backbone, head, optimizer, LR
schedule and stepper through here, so a change to how the parts fit is made once. The batch
size exists in several derived forms; `BatchPlan` computes them once from the config and the
world size, and the checkpoint stores it (`of-face info` reads it back).
"""
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import oneflow as flow
import oneflow.nn as nn

from of_face import parallel
from of_face.config import Config, ConfigError
from of_face.heads import PartialFC, build_head
from of_face.heads.memory import DoesNotFit, choose_chunks, one_job
from of_face.models import build_backbone
from of_face.models.weights import load_backbone
from of_face.oneflow_compat import LRScheduler, sync
from of_face.train.amp_sparse import AmpSparseStep
from of_face.train.eager_step import EagerStep
from of_face.train.optim import build_optimizer, build_scheduler
from of_face.train.steps import GraphStep, StepOptions, StepParts, Stepper
from of_face.train.streamed_step import OneJobStep, StreamStep

# Global.mode -> stepper class; AMP with sparse FC updates takes AmpSparseStep (`stepper_class`)
StepperClass = Callable[[StepParts, StepOptions], Stepper]
STEPPERS: Dict[str, StepperClass] = {"graph": GraphStep, "eager": EagerStep}


@dataclass(frozen=True)
class BatchPlan:
    """How many samples one step sees, in each of the forms the parts need.

    per_rank:        Data.batch_size, one micro-batch on one rank
    world:           ranks
    accum_steps:     micro-batches per optimizer step (Optimizer.accum_steps)
    steps_per_epoch: optimizer steps in one pass over the data (0: not known, e.g. a bench)
    """
    per_rank: int
    world: int
    accum_steps: int = 1
    steps_per_epoch: int = 0

    @property
    def loader_batch(self) -> int:
        """Samples one rank's loader yields per optimizer step (its micro-batches together)."""
        return self.per_rank * self.accum_steps

    @property
    def micro_global(self) -> int:
        """Samples the head sees at once: one micro-batch of every rank (PartialFC's positives)."""
        return self.per_rank * self.world

    @property
    def step_global(self) -> int:
        """Samples per optimizer step over all ranks: the global batch of the LR and of logs."""
        return self.per_rank * self.world * self.accum_steps

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int = 0, world: Optional[int] = None) -> "BatchPlan":
        return cls(cfg.Data.batch_size, world or parallel.world_size(), cfg.Optimizer.accum_steps, steps_per_epoch)

    def to_dict(self) -> Dict[str, int]:
        return dict(asdict(self), loader_batch=self.loader_batch, micro_global=self.micro_global,
                    step_global=self.step_global)

    def describe(self) -> str:
        accum = f" x {self.accum_steps} micro-batches" if self.accum_steps > 1 else ""
        return (f"batch {self.per_rank} per rank x {self.world} rank(s){accum} = global batch {self.step_global}")


@dataclass
class TrainingSystem:
    """Everything one training run steps: built by `build`, driven by the trainer."""
    backbone: nn.Module  # broadcast over the ranks
    head: PartialFC  # class-split FC + PartialFC + margin + CE
    optimizer: flow.optim.Optimizer
    scheduler: LRScheduler  # compiled into the graph in graph mode
    step: Stepper
    batch_plan: BatchPlan
    total_steps: int
    warmup_steps: int

    @property
    def parts(self) -> StepParts:
        """What the stepper steps (another stepper over the same parts: `STEPPERS[mode](parts, options)`)."""
        return StepParts(self.backbone, self.head, self.optimizer, self.scheduler)


def schedule_length(cfg: Config, steps_per_epoch: int) -> Tuple[int, int]:
    """(total optimizer steps, warm-up steps) of a run."""
    total = cfg.Global.epochs * steps_per_epoch
    if cfg.Global.max_steps:
        total = min(total, cfg.Global.max_steps) if total else cfg.Global.max_steps
    if cfg.LRScheduler.warmup_steps:
        return total, cfg.LRScheduler.warmup_steps
    return total, int(cfg.LRScheduler.warmup_epochs * steps_per_epoch)


def build(cfg: Config, num_classes: int, steps_per_epoch: int = 0, *, backbone: Optional[nn.Module] = None,
          total_steps: Optional[int] = None, warmup_steps: Optional[int] = None,
          stepper: Optional[StepperClass] = None) -> TrainingSystem:
    """Wire a run: backbone (from `Model`, or the local module given; `Global.pretrained` loaded
    into it), broadcast over the ranks; the head from `Loss`/`Optimizer`; one optimizer; the LR
    schedule; the stepper of `Global.mode`. Every rank calls it with the same arguments.

    total_steps / warmup_steps default to the config's epochs (or max_steps) and warm-up epochs
    over `steps_per_epoch`; callers without a data set (benches, test workers) pass them.
    `stepper` replaces `stepper_class`'s choice (benches and tests of another stepper's path).
    """
    plan = BatchPlan.from_config(cfg, steps_per_epoch)
    total, warmup = schedule_length(cfg, steps_per_epoch)
    total = total if total_steps is None else total_steps
    warmup = warmup if warmup_steps is None else warmup_steps
    flow.manual_seed(cfg.Global.seed)  # same seed on every rank: identical broadcast initialisation
    if backbone is None:
        backbone = build_backbone(cfg.Model)
    # The backbone's initialisers run on OneFlow's VM thread and draw from the default CPU
    # generator, from which the global random ops below (FC init, in-graph sampling seeds)
    # take their seeds on this thread: without waiting here the two race and the FC init
    # differs from run to run (measured: different first losses for the same seed).
    sync()
    if cfg.Global.pretrained:
        try:
            load_backbone(backbone, cfg.Global.pretrained)
        except ValueError as e:
            raise ConfigError(f"Global.pretrained: {e}") from None
    backbone = parallel.broadcast_module(backbone, cfg.Global.device)
    head = build_head(cfg, num_classes, plan.micro_global)  # sampled per micro-batch
    if cfg.Global.pin_cpus and head.weight.placement.type == "cpu":
        parallel.pin_local_cpus()  # before any job is compiled: its threads inherit the block
    optimizer = build_optimizer(cfg.Optimizer, backbone, head)
    scheduler = build_scheduler(optimizer, total, warmup, cfg.LRScheduler.power)
    parts = StepParts(backbone, head, optimizer, scheduler)
    options = replace(StepOptions.from_config(cfg), fc_chunks=fc_chunks(cfg, head, plan, parts.trains_backbone))
    step = (stepper or stepper_class(cfg, head, options))(parts, options)
    return TrainingSystem(backbone, head, optimizer, scheduler, step, plan, total, warmup)


def fc_chunks(cfg: Config, head: PartialFC, plan: BatchPlan, trains_backbone: bool = True) -> int:
    """The K of `Loss.fc_chunks` for this head (auto: heads/memory.py's choice)."""
    chunks = cfg.Loss.fc_chunks
    device = head.weight.placement.type
    if device != "cpu":  # streaming answers OneFlow's CPU memory planning; its row update is the host's
        if chunks == "auto":
            return 1
        if chunks > 1:
            raise ConfigError(f"Loss.fc_chunks: {chunks} chunks stream the FC on CPU only (on {device} "
                              f"OneFlow reuses a compiled job's memory); expected 1 or auto")
    if chunks == "auto":
        try:
            return choose_chunks(cfg, head, plan.micro_global, trains_backbone).chunks
        except DoesNotFit as e:
            raise ConfigError(str(e)) from None
    if chunks > 1 and not head.sparse_update:
        raise ConfigError(f"Loss.fc_chunks: {chunks} chunks stream the sparse FC update; it needs "
                          f"Loss.sample_rate < 1 (sampling) and Optimizer.sparse_fc_update=true")
    return int(chunks)


def stepper_class(cfg: Config, head: PartialFC, options: StepOptions) -> StepperClass:
    """The stepper of `Global.mode`. In graph mode: the FC streamed in K > 1 chunks, StreamStep; at
    K = 1 on the CPU with sparse FC updates in FP32, OneJobStep (the same passes as one chunk, in one
    job: 2-3x faster than TrainGraph's head there, docs/BENCHMARKS.md P2g); under AMP with sparse FC
    updates, AmpSparseStep (the FC's sparse update outside the loss-scaled graph)."""
    if cfg.Global.mode == "graph" and options.fc_chunks > 1:
        return StreamStep
    if one_job(cfg, head):
        return OneJobStep
    if cfg.Global.mode == "graph" and cfg.AMP.enable and head.sparse_update:
        return AmpSparseStep
    return STEPPERS[cfg.Global.mode]
