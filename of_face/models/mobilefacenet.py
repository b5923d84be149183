"""MobileFaceNet as insightface's arcface_torch builds it: `mbf` and `mbf_large`.

Architecture facts (arcface_torch backbones/mobilefacenet.py, itself from cavaface):
- every unit is conv (no bias) - BN - PReLU; a *linear* unit stops after BN. The bottleneck's
  projection is linear (MobileNetV2: a ReLU on the narrow output would destroy information).
- bottleneck: 1x1 expand to `inner` channels - depthwise 3x3 (the stride lives here) - linear
  1x1 projection; a residual add only inside the stride-1 stacks (same shape in and out).
- the expansion widths are fixed at 128 / 256 / 512 and do NOT grow with `scale`; only the trunk
  (64*scale, then 128*scale channels) does. This is why mbf_large is 6.3M, not 4x of 2.06M.
- stage 1 with one block is a single *grouped* 3x3 conv with groups=64 (2 channels per group at
  scale 2, not depthwise); with more blocks it is a stack of residual bottlenecks (inner 128).
- the last stack uses inner 256 although the downsample before it uses 512 (as published).
- head: 1x1 conv unit to 512, then GDC: a depthwise 7x7 linear conv (a learned per-channel
  spatial pooling), flatten, Linear(512 -> embedding, no bias), BatchNorm1d.

`width` (insightface: 64) scales every channel count above, so a tiny CPU variant keeps the same
topology: trunk width*scale and 2*width*scale, expansions 2/4/8 x width, head 8 x width.
"""
from typing import List, Optional, Sequence, Set

import oneflow.nn as nn

from of_face.models.registry import low_dim_parameters, register_family, register_model

BLOCKS = {"mbf": (1, 4, 6, 2), "mbf_large": (2, 8, 12, 4)}
SCALE = {"mbf": 2, "mbf_large": 4}


class ConvUnit(nn.Sequential):
    """conv (no bias) - BN [- PReLU]. `linear=True` drops the activation."""

    def __init__(self, cin, cout, kernel=1, stride=1, groups=1, linear=False):
        # 3x3 keeps the size (pad 1); 1x1 and the GDC's 7x7 (7x7 map -> 1x1) are unpadded.
        padding = 1 if kernel == 3 else 0
        layers = [
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """1x1 expand -> depthwise 3x3 (stride) -> linear 1x1 project, optional identity shortcut."""

    def __init__(self, cin, cout, inner, stride=1, residual=False):
        super().__init__()
        assert not residual or (cin == cout and stride == 1), "a residual add needs equal shapes"
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(cin, inner, 1),
            ConvUnit(inner, inner, 3, stride=stride, groups=inner),
            ConvUnit(inner, cout, 1, linear=True),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


def residual_stack(channels, blocks, inner):
    return nn.Sequential(*[Bottleneck(channels, channels, inner, residual=True) for _ in range(blocks)])


class GDC(nn.Sequential):
    """Global depthwise conv head: 7x7 depthwise linear conv, flatten, Linear, BatchNorm1d."""

    def __init__(self, channels, embedding_size):
        super().__init__(
            ConvUnit(channels, channels, 7, groups=channels, linear=True),
            nn.Flatten(1),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )


class MobileFaceNet(nn.Module):
    def __init__(self, blocks=BLOCKS["mbf"], scale=2, width=64, embedding_size=512):
        super().__init__()
        w = width
        c1, c2 = w * scale, 2 * w * scale  # trunk widths: 56x56/28x28, then 14x14/7x7
        # 112 -> 56: plain 3x3 stride-2 unit
        stem = [ConvUnit(3, c1, 3, stride=2)]
        if blocks[0] == 1:
            stem.append(ConvUnit(c1, c1, 3, groups=w))  # grouped, `scale` channels per group
        else:
            stem.append(residual_stack(c1, blocks[0], 2 * w))
        self.stem = nn.Sequential(*stem)
        self.stage2 = nn.Sequential(Bottleneck(c1, c1, 2 * w, stride=2), residual_stack(c1, blocks[1], 2 * w))  # ->28
        self.stage3 = nn.Sequential(Bottleneck(c1, c2, 4 * w, stride=2), residual_stack(c2, blocks[2], 4 * w))  # ->14
        self.stage4 = nn.Sequential(Bottleneck(c2, c2, 8 * w, stride=2), residual_stack(c2, blocks[3], 4 * w))  # ->7
        self.conv_sep = ConvUnit(c2, 8 * w, 1)
        self.features = GDC(8 * w, embedding_size)
        self._init_weights()

    def _init_weights(self):
        # insightface: Kaiming-normal (fan_out, relu gain) for convs and the linear layer.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stem(x))))
        return self.features(self.conv_sep(x))

    def no_weight_decay(self) -> Set[str]:
        return low_dim_parameters(self)

    def checkpoint_blocks(self) -> List[str]:
        # one checkpoint per residual unit, as for IResNet and FaceViT: the residual bottlenecks
        # of the stride-1 stacks; the three stride-2 downsampling bottlenecks keep their activations
        return [name for name, m in self.named_modules() if isinstance(m, Bottleneck) and m.residual]


@register_model(*BLOCKS, family="mbf")
def mobilefacenet(name: str = "mbf", layers: Optional[Sequence[int]] = None, width: int = 64,
                  embedding_size: int = 512) -> MobileFaceNet:
    """`layers` overrides the four block counts of `name`; `scale` always comes from `name`."""
    blocks = tuple(layers) if layers is not None else BLOCKS[name]
    return MobileFaceNet(blocks, SCALE[name], width=width, embedding_size=embedding_size)


def validate(cfg) -> None:
    """Nothing family-specific: every shared field (layers, width) applies to MobileFaceNet."""


def from_cfg(cfg) -> MobileFaceNet:
    # layers: the four block counts; width: the 64-channel base unit (tiny variants)
    return mobilefacenet(cfg.name, layers=cfg.layers, width=cfg.width, embedding_size=cfg.embedding_size)


register_family("mbf", validate=validate, from_cfg=from_cfg)
