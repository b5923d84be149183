"""IResNet (insightface's "improved ResNet" for 112x112 faces), depths 18/34/50/100/200.

Block: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus a 1x1 conv + BN shortcut when
the shape changes. No activation after the addition (insightface's choice). Head:
BN2d - dropout - Linear(C*7*7 -> embedding) - BatchNorm1d whose scale is frozen at 1.0.
`width` scales all channels (64 = insightface), so tiny CPU variants share the same code.
"""
from typing import List, Optional, Sequence, Set

import oneflow as flow
import oneflow.nn as nn

from of_face.models.registry import low_dim_parameters, register_family, register_model

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3], 200: [6, 26, 60, 6]}
BN_EPS = 1e-5


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + shortcut


class IResNet(nn.Module):
    def __init__(self, layers, width=64, embedding_size=512, dropout=0.0):
        super().__init__()
        self.conv1 = conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.prelu = nn.PReLU(width)
        stages, cin = [], width
        for i, blocks in enumerate(layers):
            cout = width * 2**i
            stages.append(self._stage(cin, cout, blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights()

    @staticmethod
    def _stage(cin, cout, blocks):
        # Every stage halves the resolution: 112 -> 56 -> 28 -> 14 -> 7.
        return nn.Sequential(IBasicBlock(cin, cout, 2), *[IBasicBlock(cout, cout, 1) for _ in range(blocks - 1)])

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # The embedding BN only centres: its scale stays 1.0 (not trained), as in insightface.
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        x = self.fc(flow.flatten(x, 1))
        return self.features(x)

    def no_weight_decay(self) -> Set[str]:
        return low_dim_parameters(self)

    def checkpoint_blocks(self) -> List[str]:
        # each basic block is one residual unit: recomputing it needs only its input
        return [name for name, m in self.named_modules() if isinstance(m, IBasicBlock)]


@register_model(*[f"iresnet{d}" for d in DEPTHS], "iresnet", family="iresnet")
def iresnet(name: str = "iresnet50", layers: Optional[Sequence[int]] = None, **kwargs) -> IResNet:
    """`iresnet<depth>` (published block counts) or `iresnet` with explicit `layers`."""
    if layers is None:
        if name == "iresnet":
            raise ValueError("Model.name=iresnet needs Model.layers (four block counts)")
        layers = DEPTHS[int(name[len("iresnet"):])]
    return IResNet(layers, **kwargs)


def validate(cfg) -> None:
    if cfg.name == "iresnet" and cfg.layers is None:
        raise ValueError("Model.name=iresnet needs Model.layers (four block counts)")


def from_cfg(cfg) -> IResNet:
    return iresnet(cfg.name, layers=cfg.layers, width=cfg.width, embedding_size=cfg.embedding_size,
                   dropout=cfg.dropout)


register_family("iresnet", validate=validate, from_cfg=from_cfg)
