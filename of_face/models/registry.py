"""Model registry (timm style) and the training hooks every backbone declares.

A family file registers its builder with `@register_model(*names, family=...)` and its config
rules with `register_family(family, validate=..., from_cfg=...)`; nothing outside the family
file needs to know its block classes or parameter names. This module imports no family file
(the family files import it), so `of_face/models/__init__.py` is where they are all loaded.

Training hooks, asked through `no_weight_decay(backbone)` / `checkpoint_blocks(backbone)` so
that any nn.Module works (tests train plain nn.Sequential backbones):
- `model.no_weight_decay() -> set[str]`: parameter names (as in `named_parameters()`) that get
  no weight decay when Optimizer.no_weight_decay_on_bn_bias is set;
- `model.checkpoint_blocks() -> list[str]`: dotted module names that activation checkpointing
  marks (each is recomputed in backward).
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Set, TypeVar

import oneflow.nn as nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

MODELS: Dict[str, Callable[..., nn.Module]] = {}  # name -> the published model with its defaults
FAMILY: Dict[str, str] = {}  # name -> family (iresnet | mbf | vit)


@dataclass(frozen=True)
class Family:
    # validate(model_cfg) raises ValueError naming the key; config.py turns it into ConfigError
    validate: Callable[[Any], None]
    # from_cfg(model_cfg) builds the model, reading only the family's own fields
    from_cfg: Callable[[Any], nn.Module]


FAMILIES: Dict[str, Family] = {}


class _Named:
    """`MODELS[name]()` == `builder(name)`; a small class rather than a lambda so that it
    pickles and prints its name."""

    def __init__(self, builder: Callable[..., nn.Module], name: str):
        self.builder, self.name = builder, name

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.builder(self.name, **kwargs)

    def __repr__(self) -> str:
        return f"{self.builder.__name__}({self.name!r})"


def register_model(*names: str, family: str) -> Callable[[Builder], Builder]:
    """Decorator: `builder(name, **kwargs)` builds each of `names`, all of one `family`.

    A name registered twice is an error: two files claiming one name would silently make
    the config mean whichever file was imported last.
    """
    def decorate(builder: Builder) -> Builder:
        for name in names:
            if name in MODELS:
                raise ValueError(f"model {name!r} is already registered ({FAMILY[name]})")
            MODELS[name], FAMILY[name] = _Named(builder, name), family
        return builder
    return decorate


def register_family(family: str, *, validate: Callable[[Any], None], from_cfg: Callable[[Any], nn.Module]) -> None:
    """Declare how a family checks and builds a `ModelCfg` (duck-typed: models sit below config)."""
    if family in FAMILIES:
        raise ValueError(f"model family {family!r} is already registered")
    FAMILIES[family] = Family(validate=validate, from_cfg=from_cfg)


def _family(model_cfg: Any) -> Family:
    if model_cfg.name not in FAMILY:
        raise ValueError(f"Model.name: unknown model '{model_cfg.name}'")
    return FAMILIES[FAMILY[model_cfg.name]]


def validate(model_cfg: Any) -> None:
    """The family-specific rules of a `ModelCfg` (ValueError). Plain range checks of each
    field stay in `ModelCfg.check`, which calls this."""
    _family(model_cfg).validate(model_cfg)


def build_backbone(model_cfg: Any) -> nn.Module:
    """Build the backbone named in a `ModelCfg` (local module; parallel.py places it)."""
    family = _family(model_cfg)
    family.validate(model_cfg)  # also when the config was built in code and never checked
    return family.from_cfg(model_cfg)


# --------------------------------------------------------------------------- training hooks


def low_dim_parameters(module: nn.Module) -> Set[str]:
    """Names of parameters with dim <= 1: BN/LayerNorm scales and shifts, PReLU slopes, biases.

    The generic no-decay rule (as arcface_torch / timm): decaying these only pulls normalisation
    scales towards 0, it does not regularise any weight matrix.
    """
    return {name for name, p in module.named_parameters() if p.dim() <= 1}


def no_weight_decay(backbone: nn.Module) -> Set[str]:
    """The backbone's own `no_weight_decay()` when it declares one, else the dim <= 1 rule."""
    hook = getattr(backbone, "no_weight_decay", None)
    return set(hook()) if callable(hook) else low_dim_parameters(backbone)


def checkpoint_blocks(backbone: nn.Module) -> List[str]:
    """The backbone's own `checkpoint_blocks()` when it declares one, else none (a module that
    does not name its blocks cannot be checkpointed block by block)."""
    hook = getattr(backbone, "checkpoint_blocks", None)
    return list(hook()) if callable(hook) else []
