"""Backbone registry: a name in the config -> a constructor.

`MODELS[name]()` builds the published model with its defaults (parameter-count tests use this);
`build_backbone(model_cfg)` builds it from a `ModelCfg`, each family reading only its own fields.
`FAMILY[name]` says which family a name belongs to (iresnet | mbf | vit).
"""
import functools

from of_face.models import face_vit as _vit
from of_face.models import iresnet as _iresnet
from of_face.models import mobilefacenet as _mbf

MODELS, FAMILY = {}, {}


def _register(family, name, constructor):
    MODELS[name], FAMILY[name] = constructor, family


for _d in _iresnet.DEPTHS:
    _register("iresnet", f"iresnet{_d}", functools.partial(_iresnet.iresnet, _d))
_register("iresnet", "iresnet", functools.partial(_iresnet.iresnet, None))
for _name in _mbf.BLOCKS:
    _register("mbf", _name, functools.partial(_mbf.mobilefacenet, _name))
for _name in list(_vit.SIZES) + list(_vit.PLSC_NAMES):
    _register("vit", _name, functools.partial(_vit.face_vit, _name))


def _iresnet_from_cfg(constructor, cfg):
    if cfg.name == "iresnet" and cfg.layers is None:
        raise ValueError("Model.name=iresnet needs Model.layers (four block counts)")
    return constructor(layers=cfg.layers, width=cfg.width, embedding_size=cfg.embedding_size, dropout=cfg.dropout)


def _mbf_from_cfg(constructor, cfg):
    # layers: the four block counts; width: the 64-channel base unit (tiny variants)
    return constructor(layers=cfg.layers, width=cfg.width, embedding_size=cfg.embedding_size)


def _vit_from_cfg(constructor, cfg):
    if cfg.layers is not None:
        raise ValueError(f"Model.layers does not apply to {cfg.name}; use Model.vit_depth")
    return constructor(dim=cfg.vit_dim, depth=cfg.vit_depth, embedding_size=cfg.embedding_size,
                       mask_ratio=cfg.mask_ratio, drop_path_rate=cfg.drop_path_rate)


_FROM_CFG = {"iresnet": _iresnet_from_cfg, "mbf": _mbf_from_cfg, "vit": _vit_from_cfg}


def build_backbone(model_cfg):
    """Build the backbone named in a `ModelCfg` (local module; parallel.py places it)."""
    name = model_cfg.name
    return _FROM_CFG[FAMILY[name]](MODELS[name], model_cfg)
