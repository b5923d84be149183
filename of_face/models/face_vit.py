"""FaceViT: the ViT of insightface's arcface_torch (`vit_t/s/b/l`) and PLSC (`FaceViT_*_patch9_112`).

Architecture facts (arcface_torch backbones/vit.py; PLSC plsc/models/face_vit.py is a port):
- 112x112 input, 9x9 patches with stride 9: 112 // 9 = 12, so 12x12 = 144 tokens; the conv just
  never reaches the last 4 pixel rows/columns. No class token; a learned position embedding
  [1, 144, D] is added to every token.
- pre-norm blocks: x + DropPath(MHSA(LN(x))), x + DropPath(MLP(LN(x))). 8 heads, qkv without
  bias, output projection with bias. MLP ratio 4 with **ReLU6** (both references pass
  act_layer=nn.ReLU6; it is not GELU). Drop path rises linearly 0 -> drop_path_rate over depth.
- final LayerNorm, then the head: flatten [N, 144*D] -> Linear(144*D -> D, no bias) -> BN1d(D)
  -> Linear(D -> embedding, no bias) -> BN1d(embedding), both BNs with eps 2e-5.
- sizes (D, depth): tiny 256/12, small 512/12, base 512/24, large 768/24.

Token masking (training only, as in arcface_torch / PLSC, following MAE): per sample, a random
subset of the 144 tokens is *dropped* before the blocks, so attention only ever sees the kept
tokens (cheaper, and the model cannot attend to the mask token). After the final norm the kept
tokens are scattered back to their positions and a learned mask token fills the dropped ones, so
the flattened head always sees 144 slots. Differences from the references, on purpose:
- the configured `mask_ratio` is used (both references call random_masking() without it, so they
  always mask their default 0.1);
- exactly round(144 * mask_ratio) tokens are masked (the references keep int(144 * (1 - r)),
  which masks one more token when 144 * r is not an integer: 15 instead of 14 at r = 0.1).
Eval mode masks nothing and is deterministic.

The random choice is made with oneflow ops (rand -> argsort) on the tokens' own placement/SBP,
so it also runs inside nn.Graph on global tensors split along the batch.

flowvision 0.2.1's DropPath and trunc_normal_ import fine but are not used: its drop_path asks
for `x.device`, which global tensors lack, and its exact truncated normal is slower on CPU
than oneflow's normal-then-clamp. With std .02 and the references' absolute bounds [-2, 2]
(100 sigma) both are the same distribution, so oneflow's is used.
"""
from typing import List, Set

import oneflow as flow
import oneflow.nn as nn

from of_face.models.registry import low_dim_parameters, register_family, register_model

IMG_SIZE, PATCH = 112, 9
NUM_HEADS, MLP_RATIO = 8, 4
BN_EPS = 2e-5  # the head's BatchNorms, as published
SIZES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
PLSC_NAMES = {"FaceViT_tiny_patch9_112": "vit_t", "FaceViT_small_patch9_112": "vit_s",
              "FaceViT_base_patch9_112": "vit_b", "FaceViT_large_patch9_112": "vit_l"}


def rand_like_tokens(shape, x):
    """Uniform [0, 1) noise shaped `shape`, placed like `x` (global or local) for the batch axis."""
    if x.is_global:
        return flow.rand(*shape, placement=x.placement, sbp=x.sbp)
    return flow.rand(*shape, device=x.device)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescale the survivors.

    Own copy because flowvision's drop_path builds its noise with `device=x.device`, which a
    global tensor does not have; here the noise follows x's placement and SBP.
    """

    def __init__(self, prob):
        super().__init__()
        self.prob = float(prob)

    def forward(self, x):
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        noise = rand_like_tokens((x.shape[0],) + (1,) * (x.dim() - 1), x)
        return x / keep * flow.floor(noise + keep)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"token width {dim} is not divisible by {heads} heads"
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [N, heads, L, head_dim]
        attn = flow.softmax(flow.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = flow.matmul(attn, v).transpose(1, 2).reshape(n, length, dim)
        return self.proj(out)


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """9x9 stride-9 conv: [N, 3, 112, 112] -> [N, 144, D] (the last 4 pixels are never covered)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.num_patches = (IMG_SIZE // PATCH) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    def __init__(self, dim=256, depth=12, heads=NUM_HEADS, embedding_size=512, mask_ratio=0.0,
                 drop_path_rate=0.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.patch_embed = PatchEmbed(dim)
        self.num_patches = length = self.patch_embed.num_patches
        # At least one token stays visible, or attention would have nothing to attend to.
        self.num_masked = min(int(round(length * mask_ratio)), length - 1)
        self.pos_embed = nn.Parameter(flow.zeros(1, length, dim))
        self.mask_token = nn.Parameter(flow.zeros(1, 1, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.blocks = nn.Sequential(*[Block(dim, heads, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(length * dim, dim, bias=False),
            nn.BatchNorm1d(dim, eps=BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self):
        # arcface_torch: truncated normal (std .02) for the position embedding and every Linear
        # weight, zero Linear biases, normal(.02) mask token; the patch conv keeps its default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def random_masking(self, tokens):
        """Choose `num_masked` random tokens per sample and drop them.

        Returns (kept [N, L - num_masked, D], ids_restore [N, L], mask [N, L] bool, True = masked).
        Sorting uniform noise gives each sample an independent random permutation; its first
        L - num_masked entries are the kept tokens, in a random order that ids_restore undoes.
        """
        n, length, dim = tokens.shape
        keep = length - self.num_masked
        ids_shuffle = flow.argsort(rand_like_tokens((n, length), tokens), dim=1)
        ids_restore = flow.argsort(ids_shuffle, dim=1)  # position -> its rank in the shuffle
        ids_keep = ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim)
        kept = flow.gather(tokens, 1, ids_keep)
        return kept, ids_restore, ids_restore >= keep

    def restore(self, kept, ids_restore, mask):
        """Put kept tokens back in place; the learned mask token fills the masked slots."""
        dim = kept.shape[-1]
        padded = flow.nn.functional.pad(kept, (0, 0, 0, self.num_masked))  # zeros at ranks >= keep
        tokens = flow.gather(padded, 1, ids_restore.unsqueeze(-1).repeat(1, 1, dim))
        return tokens + self.mask_token * mask.unsqueeze(-1).to(tokens.dtype)

    def encode(self, tokens):
        """Transformer blocks + final norm over however many tokens are given."""
        return self.norm(self.blocks(tokens))

    def embed(self, x):
        """Images -> position-embedded patch tokens [N, 144, D]."""
        return self.patch_embed(x) + self.pos_embed

    def forward_tokens(self, x):
        """Images -> (the 144 tokens the head sees, mask [N, 144] bool or None when not masking)."""
        tokens = self.embed(x)
        if not (self.training and self.num_masked > 0):
            return self.encode(tokens), None
        kept, ids_restore, mask = self.random_masking(tokens)
        return self.restore(self.encode(kept), ids_restore, mask), mask

    def forward_with_mask(self, x):
        tokens, mask = self.forward_tokens(x)
        return self.feature(flow.flatten(tokens, 1)), mask

    def forward(self, x):
        return self.forward_with_mask(x)[0]

    def no_weight_decay(self) -> Set[str]:
        # the position embedding and mask token are embeddings, not weights: decaying them would
        # pull every token towards the same (zero) position / fill (as timm and arcface_torch)
        return low_dim_parameters(self) | {"pos_embed", "mask_token"}

    def checkpoint_blocks(self) -> List[str]:
        return [name for name, m in self.named_modules() if isinstance(m, Block)]


@register_model(*SIZES, *PLSC_NAMES, family="vit")
def face_vit(name: str = "vit_t", dim: int = 0, depth: int = 0, embedding_size: int = 512,
             mask_ratio: float = 0.0, drop_path_rate: float = 0.0) -> FaceViT:
    """A named size; dim / depth > 0 override it (tiny test variants)."""
    named_dim, named_depth = SIZES[PLSC_NAMES.get(name, name)]
    return FaceViT(dim or named_dim, depth or named_depth, embedding_size=embedding_size,
                   mask_ratio=mask_ratio, drop_path_rate=drop_path_rate)


def validate(cfg) -> None:
    if cfg.layers is not None:
        raise ValueError(f"Model.layers: does not apply to {cfg.name}; use Model.vit_depth")
    if cfg.vit_dim % NUM_HEADS:
        raise ValueError(f"Model.vit_dim: must be a multiple of the {NUM_HEADS} attention heads, got {cfg.vit_dim}")


def from_cfg(cfg) -> FaceViT:
    return face_vit(cfg.name, dim=cfg.vit_dim, depth=cfg.vit_depth, embedding_size=cfg.embedding_size,
                    mask_ratio=cfg.mask_ratio, drop_path_rate=cfg.drop_path_rate)


register_family("vit", validate=validate, from_cfg=from_cfg)
