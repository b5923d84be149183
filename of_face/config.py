"""Typed, validated run settings: YAML file + `-o Section.key=value` overrides.

Sections follow PLSC's configs (Global, Model, Loss, Data, Optimizer, LRScheduler, AMP, Eval)
so a PLSC user can read them without the code. Every key is a dataclass field: an unknown key,
a wrong type or an impossible value stops with one `ConfigError` naming the key.
"""
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml

from of_face import strict_yaml
from of_face.config_fields import ConfigError, _at_least, _build, _choice, _parse_override
from of_face.data.record_index import FLOAT32_EXACT
from of_face.device import DEVICES, device_hint
from of_face.io import PathLike, atomic_write


FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class GlobalCfg:
    mode: str = "graph"  # graph | eager: how one training step runs
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 2022
    output_dir: str = "./output/default"
    epochs: int = 1
    max_steps: int = 0  # > 0 stops after this many optimizer steps (smoke runs, tests)
    log_interval: int = 10
    eval_interval: int = 0  # steps between verifications; 0 = only at the end
    eval_before_training: bool = True  # print the untrained model's accuracy as a baseline
    pretrained: Optional[str] = None
    # checkpoints (of_face/run/checkpoint.py): ckpt-<step>.npz in output_dir every save_interval steps
    # (0 = only at the end) and at the end; the newest keep_checkpoints are kept (0 = all)
    save_interval: int = 0
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # auto (newest complete checkpoint in output_dir, if any) | a ckpt file | a folder
    max_nonfinite_steps: int = 1  # stop once the loss is NaN/inf for this many consecutive steps
    # a fresh run into a folder holding another run's checkpoints moves them to replaced-<time>/ (of_face/run/folder.py)
    overwrite: bool = False
    allow_resume_changes: List[str] = field(default_factory=list)  # e.g. [Optimizer.name], [Model]: resume anyway
    # npz (one file, rank 0) | sharded (every rank its FC rows: run/shards.py) | auto (sharded once
    # the FC weight reaches SHARDED_FROM_BYTES: at millions of classes one file on rank 0 does not scale)
    checkpoint_format: str = "auto"
    # CPU runs with several ranks on one machine: each rank's threads keep to its own block of the
    # CPUs (parallel.pin_local_cpus). Faster for a large FC, slower for small runs that load data
    # and compile (docs/BENCHMARKS.md P2e), so off unless asked for
    pin_cpus: bool = False

    def check(self) -> None:
        _choice("Global.mode", self.mode, ("graph", "eager"))
        _choice("Global.checkpoint_format", self.checkpoint_format, ("auto", "npz", "sharded"))
        _at_least("Global.save_interval", self.save_interval, 0)
        _at_least("Global.keep_checkpoints", self.keep_checkpoints, 0)
        _at_least("Global.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        if self.device not in DEVICES:
            raise ConfigError(f"Global.device: expected one of {', '.join(DEVICES)}, got '{self.device}'; "
                              f"{device_hint(self.device)}")
        _at_least("Global.epochs", self.epochs, 1)
        _at_least("Global.max_steps", self.max_steps, 0)
        _at_least("Global.log_interval", self.log_interval, 1)
        _at_least("Global.eval_interval", self.eval_interval, 0)


@dataclass
class ModelCfg:
    # iresnet18/34/50/100/200 or iresnet (explicit `layers`); mbf, mbf_large (MobileFaceNet);
    # vit_t/vit_s/vit_b/vit_l (FaceViT, also PLSC's FaceViT_{tiny,small,base,large}_patch9_112)
    name: str = "iresnet50"
    layers: Optional[List[int]] = None  # blocks per stage (iresnet, mbf), overrides the depth in `name`
    # base channel count (insightface: 64): IResNet stages are 1x/2x/4x/8x; MobileFaceNet's trunk
    # is 64*scale, its expansions 2x/4x/8x. Smaller values give tiny CPU variants.
    width: int = 64
    embedding_size: int = 512
    dropout: float = 0.0  # iresnet only
    drop_path_rate: float = 0.0  # FaceViT stochastic depth, rising linearly from 0 over the blocks
    mask_ratio: float = 0.0  # FaceViT: share of the 144 patch tokens masked per training image
    vit_dim: int = 0  # FaceViT token width; 0 = the named size (256 / 512 / 512 / 768)
    vit_depth: int = 0  # FaceViT block count; 0 = the named size (12 / 12 / 24 / 24)
    # recompute each residual/transformer block's forward in backward instead of storing its
    # activations (less memory, ~1 extra forward); graph mode only
    activation_checkpointing: bool = False

    def check(self) -> None:
        from of_face.models import MODELS, validate

        _choice("Model.name", self.name, tuple(MODELS))
        # each field's own range here; what applies to which family is the family's rule
        if self.layers is not None and (len(self.layers) != 4 or min(self.layers) < 1):
            raise ConfigError(f"Model.layers: expected 4 positive block counts, got {self.layers}")
        _at_least("Model.width", self.width, 1)
        _at_least("Model.embedding_size", self.embedding_size, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Model.dropout: expected a value in [0, 1), got {self.dropout}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"Model.drop_path_rate: expected a value in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"Model.mask_ratio: expected a value in [0, 1), got {self.mask_ratio}")
        _at_least("Model.vit_dim", self.vit_dim, 0)
        _at_least("Model.vit_depth", self.vit_depth, 0)
        try:  # models sit below config and raise plain ValueError; same message, config's type
            validate(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class LossCfg:
    num_classes: int = 0  # 0 = take it from the data set's `property` file
    margin: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])  # m1, m2, m3: ArcFace
    scale: float = 64.0
    sample_rate: float = 1.0  # PartialFC: share of class centres kept per step
    # the head streamed in K chunks of the kept classes (less memory; needs sparse FC updates):
    # an integer K >= 1, or auto (the smallest K whose predicted peak fits fc_memory_gib)
    fc_chunks: Union[int, str] = 1
    # the per-rank budget of fc_chunks=auto; 0 = this machine's memory over its local ranks, less a margin
    fc_memory_gib: float = 0.0

    def check(self) -> None:
        _at_least("Loss.num_classes", self.num_classes, 0)
        if len(self.margin) != 3:
            raise ConfigError(f"Loss.margin: expected [m1, m2, m3], got {self.margin}")
        if self.margin[0] <= 0:
            raise ConfigError(f"Loss.margin: m1 must be > 0, got {self.margin[0]}")
        if self.scale <= 0:
            raise ConfigError(f"Loss.scale: expected > 0, got {self.scale}")
        # the largest |logit| the margins can make (the guarded ArcFace branch reaches
        # cos - m2*sin(m2) - m3 at cos = -1) must be a float32 number
        bound = self.scale * (1.0 + abs(self.margin[1]) + abs(self.margin[2]))
        if not math.isfinite(bound) or bound > FLOAT32_MAX:
            raise ConfigError(f"Loss.scale: {self.scale} makes logits up to {bound:.3g}, beyond float32 "
                              f"({FLOAT32_MAX:.3g}); use a scale like 64")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"Loss.sample_rate: expected a value in (0, 1], got {self.sample_rate}")
        if self.fc_chunks != "auto" and not (isinstance(self.fc_chunks, int) and self.fc_chunks >= 1):
            raise ConfigError(f"Loss.fc_chunks: expected an integer >= 1 or auto, got {self.fc_chunks!r}")
        if self.fc_memory_gib < 0:
            raise ConfigError(f"Loss.fc_memory_gib: expected >= 0 (0 = this machine's), got {self.fc_memory_gib}")


@dataclass
class DataCfg:
    dataset: str = "synthetic"  # synthetic | rec | folder (label.txt, else one sub-folder per identity)
    root: str = "./data/synthetic"  # folder with train.rec/train.idx/property (or the images) and the .bin sets
    batch_size: int = 64  # per rank
    num_workers: int = 0
    flip: bool = True
    resize: bool = False  # bilinear-resize images that are not 112x112; off: such an image is an error
    # extra augmentations, all off by default (each sample seeded from seed/epoch/index: see data/augment.py)
    random_crop: float = 0.0  # crop sides a random share in [1 - x, 1] of the image's, resized back to 112
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1 - x, 1 + x]
    grayscale_prob: float = 0.0  # probability of turning an image into its luma (R = G = B)
    val_targets: List[str] = field(default_factory=lambda: ["synth_val"])  # <root>/<name>.bin
    skip_bad_records: bool = False  # true: an unreadable image is replaced by the next one, and counted
    # synthetic generator (used when dataset == synthetic)
    synth_identities: int = 200
    synth_images_per_identity: int = 40
    synth_val_identities: int = 100
    synth_val_pairs: int = 600
    synth_difficulty: float = 1.0

    def check(self) -> None:
        _choice("Data.dataset", self.dataset, ("synthetic", "rec", "folder"))
        if not 0.0 <= self.random_crop < 1.0:
            raise ConfigError(f"Data.random_crop: expected a value in [0, 1), got {self.random_crop}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ConfigError(f"Data.color_jitter: expected a value in [0, 1], got {self.color_jitter}")
        if not 0.0 <= self.grayscale_prob <= 1.0:
            raise ConfigError(f"Data.grayscale_prob: expected a value in [0, 1], got {self.grayscale_prob}")
        _at_least("Data.batch_size", self.batch_size, 1)
        _at_least("Data.num_workers", self.num_workers, 0)
        _at_least("Data.synth_identities", self.synth_identities, 2)
        if self.synth_identities > FLOAT32_EXACT:  # the synthetic set is RecordIO: float32 labels
            raise ConfigError(f"Data.synth_identities: expected at most {FLOAT32_EXACT:,} (2**24, what the "
                              f"float32 labels of RecordIO can name), got {self.synth_identities:,}")
        _at_least("Data.synth_images_per_identity", self.synth_images_per_identity, 2)
        if self.synth_difficulty < 0:
            raise ConfigError(f"Data.synth_difficulty: expected >= 0, got {self.synth_difficulty}")


@dataclass
class OptimizerCfg:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float = 5.0  # global L2 norm bound on the backbone's gradients; 0 = off
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    no_weight_decay_on_bn_bias: bool = False  # BN/PReLU/bias/position-embedding get no decay
    # SparseMomentum: with PartialFC (Loss.sample_rate < 1) only the kept class centres and their
    # optimizer state change in a step; false = dense updates of the whole FC (for comparison)
    sparse_fc_update: bool = True
    # gradient accumulation: each optimizer step averages this many micro-batches of
    # Data.batch_size per rank (the loss / k); the LR schedule steps once per optimizer step
    accum_steps: int = 1

    def check(self) -> None:
        _choice("Optimizer.name", self.name, ("sgd", "adamw"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"Optimizer.betas: expected two values in [0, 1), got {self.betas}")
        if self.clip_grad_norm < 0:
            raise ConfigError(f"Optimizer.clip_grad_norm: expected >= 0, got {self.clip_grad_norm}")
        if self.lr <= 0:
            raise ConfigError(f"Optimizer.lr: expected > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"Optimizer.momentum: expected a value in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"Optimizer.weight_decay: expected >= 0, got {self.weight_decay}")
        _at_least("Optimizer.accum_steps", self.accum_steps, 1)


@dataclass
class LRSchedulerCfg:
    warmup_epochs: float = 0.0  # linear warm-up from 0, then polynomial decay to 0
    warmup_steps: int = 0  # > 0: the warm-up in optimizer steps instead (PLSC's warmup_steps)
    power: float = 2.0  # 0: constant after warm-up

    def check(self) -> None:
        if self.warmup_epochs < 0:
            raise ConfigError(f"LRScheduler.warmup_epochs: expected >= 0, got {self.warmup_epochs}")
        _at_least("LRScheduler.warmup_steps", self.warmup_steps, 0)
        if self.power < 0:
            raise ConfigError(f"LRScheduler.power: expected >= 0, got {self.power}")


@dataclass
class AMPCfg:
    enable: bool = False
    init_scale: float = 65536.0

    def check(self) -> None:
        if self.init_scale <= 0:
            raise ConfigError(f"AMP.init_scale: expected > 0, got {self.init_scale}")


@dataclass
class Config:
    Global: GlobalCfg = field(default_factory=GlobalCfg)
    Model: ModelCfg = field(default_factory=ModelCfg)
    Loss: LossCfg = field(default_factory=LossCfg)
    Data: DataCfg = field(default_factory=DataCfg)
    Optimizer: OptimizerCfg = field(default_factory=OptimizerCfg)
    LRScheduler: LRSchedulerCfg = field(default_factory=LRSchedulerCfg)
    AMP: AMPCfg = field(default_factory=AMPCfg)

    def check(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).check()
        if self.Global.mode == "eager" and self.AMP.enable:
            raise ConfigError("AMP.enable: AMP runs in graph mode only; set Global.mode=graph or AMP.enable=false")
        if self.Optimizer.accum_steps > 1 and self.Optimizer.sparse_fc_update and self.Loss.sample_rate < 1.0:
            raise ConfigError(
                "Optimizer.accum_steps: sparse FC updates apply one step's sampled rows; with gradient "
                "accumulation set Optimizer.sparse_fc_update=false")
        if self.Global.mode == "eager" and self.Model.activation_checkpointing:
            raise ConfigError("Model.activation_checkpointing: graph mode only; set Global.mode=graph")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[PathLike] = None, overrides: Iterable[str] = ()) -> Config:
    """Read `path` (YAML) on top of the defaults, apply `Section.key=value` overrides, validate."""
    raw = {}
    if path is not None:
        if not os.path.isfile(path):
            where = "" if os.path.isabs(path) else f" (looked for {os.path.abspath(path)})"
            raise ConfigError(f"config file not found: {path}{where}")
        with open(path) as f:
            try:
                raw = strict_yaml.load(f) or {}
            except strict_yaml.DuplicateKeyError as e:
                raise ConfigError(str(e)) from None
            except yaml.YAMLError as e:
                raise ConfigError(strict_yaml.one_line(path, e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = _parse_override(item)
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping, got {raw[section]!r}")
        raw[section][name] = value
    return _build(Config, raw, prefix="").check()


def save_config(cfg: Config, path: PathLike) -> None:
    """Write the merged config atomically (of_face.io.atomic_write: temp name, fsync, rename)."""
    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
