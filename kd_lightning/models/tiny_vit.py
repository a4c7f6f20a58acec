"""A small Vision Transformer (Dosovitskiy et al. 2021) for small images such as 8x8 digits.

Used for heterogeneous distillation (CNN teacher -> Transformer student and back). Attention is
written out so its probabilities pass through a named module, ``blocks.<i>.attn.probs``, that a
forward hook can capture as a ``(B, heads, N, N)`` map.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.models.spec import records_init_args


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``probs`` (an identity) exposes the attention map to hooks."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.probs = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = self.probs(torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1))
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@records_init_args
class TinyViT(nn.Module):
    """ViT with a class token: patches -> ``depth`` blocks -> norm -> class-token head.

    Hookable layers: ``patch_embed`` (B, D, H/p, W/p), ``blocks.<i>`` tokens (B, 1+N, D),
    ``blocks.<i>.attn.probs`` attention (B, heads, 1+N, 1+N), ``norm``, ``classifier``.

    Args:
        num_classes: number of output logits.
        image_size: input height = width.
        patch_size: patch side; ``image_size`` must be a multiple of it.
        in_channels: input channels.
        dim: token width.
        depth: number of blocks.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.num_classes = num_classes
        self.image_size = image_size
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat 8x8 digits
            x = x.view(x.shape[0], 1, self.image_size, self.image_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = (
            torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        )
        return self.classifier(self.norm(self.blocks(tokens))[:, 0])
