"""insightface / arcface_torch weights -> an of_face backbone's state dict.

`import_state(path, backbone)` reads an arcface_torch `.pth` state dict (models/import_pth.py,
no PyTorch needed) or an insightface-style `.onnx` (models/import_onnx.py) and returns
{of_face name: array} for `backbone`, checked name by name and shape by shape against it; a
file of another architecture, width or embedding size stops with one line naming the first
tensor that does not fit and both shapes.

Name facts (arcface_torch backbones/ at insightface 7fadd420):
- iresnet18/34/50/100/200: the same module names as of_face's IResNet (identity mapping).
- mbf / mbf_large: arcface_torch keeps its trunk in one ModuleList `layers` and wraps every
  conv-BN[-PReLU] unit in a `.layers` Sequential; of_face names the stages (`stem`, `stage2`
  ..`stage4`, each a downsampling bottleneck `.0` and a residual stack `.1`) and its units are
  the Sequentials themselves. `layers.1` is a single grouped ConvBlock when blocks[0] == 1 and
  a Residual stack otherwise (mbf_large), told apart by the name's depth.
- vit_t/s/b/l: the same names except the MLP, `mlp.fc1`/`mlp.fc2` in arcface_torch and the
  Sequential `mlp.0`/`mlp.2` in of_face.
"""
import os
import re
from typing import Dict, List, Tuple

import numpy as np
import oneflow.nn as nn

from of_face.models.face_vit import FaceViT
from of_face.models.import_pth import WeightsFileError, flat_state_dict, read_pth
from of_face.models.iresnet import IResNet
from of_face.models.mobilefacenet import MobileFaceNet

_BUF = r"(weight|bias|running_mean|running_var|num_batches_tracked)$"
# arcface_torch trunk index -> of_face (stage, part) for MobileFaceNet
_MBF_TRUNK = {2: "stage2.0", 3: "stage2.1", 4: "stage3.0", 5: "stage3.1", 6: "stage4.0", 7: "stage4.1"}


def _mbf_rules() -> List[Tuple[str, str]]:
    rules = [(r"^layers\.0\.layers\.(\d+)\." + _BUF, r"stem.0.\1.\2"),
             (r"^layers\.1\.layers\.(\d+)\." + _BUF, r"stem.1.\1.\2"),  # single grouped ConvBlock
             (r"^layers\.1\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\." + _BUF, r"stem.1.\1.layers.\2.\3.\4")]
    for i, target in _MBF_TRUNK.items():
        if target.endswith(".0"):  # a DepthWise bottleneck: layers.<i>.layers.<j>.layers.<k>
            rules.append((rf"^layers\.{i}\.layers\.(\d+)\.layers\.(\d+)\." + _BUF, target + r".layers.\1.\2.\3"))
        else:  # a Residual stack of DepthWise bottlenecks
            rules.append((rf"^layers\.{i}\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\." + _BUF,
                          target + r".\1.layers.\2.\3.\4"))
    rules += [(r"^conv_sep\.layers\.(\d+)\." + _BUF, r"conv_sep.\1.\2"),
              (r"^features\.layers\.0\.layers\.(\d+)\." + _BUF, r"features.0.\1.\2"),
              (r"^features\.layers\.(\d+)\." + _BUF, r"features.\1.\2")]
    return rules


RULES = {
    "iresnet": [],
    "mbf": _mbf_rules(),
    "vit": [(r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.2.")],
}


def family_of(backbone: nn.Module) -> str:
    """The family whose name rules apply to a backbone module."""
    for cls, family in ((IResNet, "iresnet"), (MobileFaceNet, "mbf"), (FaceViT, "vit")):
        if isinstance(backbone, cls):
            return family
    raise WeightsFileError(f"importing insightface weights: no name mapping for {type(backbone).__name__}")


def of_face_name(name: str, family: str) -> str:
    """arcface_torch state-dict name -> of_face's (first matching rule; unmatched names are equal)."""
    for pattern, repl in RULES[family]:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def describe(backbone: nn.Module) -> str:
    return type(backbone).__name__


def check_state(state: Dict[str, np.ndarray], backbone: nn.Module, path: str,
                source_names: Dict[str, str]) -> Dict[str, np.ndarray]:
    """Every tensor present with its shape and dtype kind, else one line naming the first that does not
    fit (file order) and both shapes. `source_names` maps of_face names back to the file's."""
    own = {k: v for k, v in backbone.state_dict().items()}
    for name, value in state.items():
        src = source_names.get(name, name)
        label = f"'{src}'" + (f" (of_face '{name}')" if src != name else "")
        if name not in own:
            raise WeightsFileError(f"{path}: tensor {label} {list(value.shape)} has no place in this "
                                   f"{describe(backbone)} (another architecture?)")
        want = tuple(own[name].shape)
        if tuple(value.shape) != want:
            raise WeightsFileError(f"{path}: tensor {label} is {list(value.shape)} in the file but {list(want)} in "
                                   f"this {describe(backbone)} (another architecture, width or embedding size?)")
    missing = [k for k in own if k not in state]
    if missing:
        raise WeightsFileError(f"{path}: no tensor for of_face '{missing[0]}' {list(own[missing[0]].shape)} "
                               f"({len(missing)} missing; another architecture?)")
    return {name: np.asarray(value).astype(own[name].numpy().dtype, copy=False) for name, value in state.items()}


def from_pth(path: str, backbone: nn.Module) -> Dict[str, np.ndarray]:
    """arcface_torch state dict (.pth) -> {of_face name: array} for `backbone`."""
    family = family_of(backbone)
    state, back = {}, {}
    for name, value in flat_state_dict(read_pth(path), path).items():
        mine = of_face_name(name, family)
        state[mine], back[mine] = value, name
    return check_state(state, backbone, path, back)


def import_state(path: str, backbone: nn.Module) -> Dict[str, np.ndarray]:
    """{of_face name: array} for `backbone` from an arcface_torch .pth/.pt or an insightface .onnx."""
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: file not found")
    if path.endswith(".onnx"):
        from of_face.models.import_onnx import from_onnx

        return check_state(from_onnx(path, backbone), backbone, path, {})
    return from_pth(path, backbone)


IMPORTABLE = (".pth", ".pt", ".onnx")


def is_foreign(path: str) -> bool:
    """Whether a weights path is an insightface/arcface_torch file (imported) rather than backbone.npz."""
    return path.endswith(IMPORTABLE)
