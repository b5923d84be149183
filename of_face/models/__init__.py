"""Backbones: a name in the config -> a model that declares its own training hooks.

`MODELS[name]()` builds the published model with its defaults (parameter-count tests use this);
`build_backbone(model_cfg)` builds it from a `ModelCfg`, each family reading only its own fields;
`validate(model_cfg)` applies the family's own config rules (ValueError);
`FAMILY[name]` says which family a name belongs to (iresnet | mbf | vit).
`no_weight_decay(backbone)` / `checkpoint_blocks(backbone)` ask any module for its training
hooks (see registry.py), so the optimizer and the graph never name a block class or parameter.

A new family: one file that uses `@register_model` and `register_family`, imported below.
"""
# Imported for their registrations (each family file fills MODELS / FAMILY / FAMILIES), in the
# order the `Model.name` choices are listed in error messages (so not sorted).
from of_face.models import iresnet, mobilefacenet, face_vit  # noqa: F401, I001
from of_face.models.registry import (
    FAMILIES, FAMILY, MODELS, build_backbone, checkpoint_blocks, low_dim_parameters, no_weight_decay,
    register_family, register_model, validate,
)

__all__ = [
    "FAMILIES", "FAMILY", "MODELS", "build_backbone", "checkpoint_blocks", "low_dim_parameters",
    "no_weight_decay", "register_family", "register_model", "validate",
]
