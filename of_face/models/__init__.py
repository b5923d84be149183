"""Backbone registry: a name in the config -> a constructor."""
import functools

from of_face.models import iresnet as _iresnet

MODELS = {f"iresnet{d}": functools.partial(_iresnet.iresnet, d) for d in _iresnet.DEPTHS}
MODELS["iresnet"] = functools.partial(_iresnet.iresnet, None)


def build_backbone(model_cfg):
    """Build the backbone named in a `ModelCfg` (local module; parallel.py places it)."""
    builder = MODELS[model_cfg.name]
    layers = model_cfg.layers
    if model_cfg.name == "iresnet" and layers is None:
        raise ValueError("Model.name=iresnet needs Model.layers (four block counts)")
    return builder(
        layers=layers, width=model_cfg.width, embedding_size=model_cfg.embedding_size, dropout=model_cfg.dropout
    )
