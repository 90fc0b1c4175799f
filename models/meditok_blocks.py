"""Building blocks of the MedITok tokenizer that timm does not provide.

The encoder trunk and the decoder's transformer blocks come from timm's ViTamin (see models/meditok.py);
what lives here is MedITok's own: the GeGLU MLP used inside every ViT block, the causal attention
projections around the quantizer, and the convolutional upsampling path at the end of the decoder.
Parameter names follow the released checkpoint so that it loads strictly.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, make_divisible


# ----------------------------------------------------------------------------------------------
# MLP and attention projections (token sequences [B, L, C])
# ----------------------------------------------------------------------------------------------
class GeGluMlp(nn.Module):
    """LayerNorm -> w2(gelu_tanh(w0 x) * w1 x). Passed to timm as `mlp_layer`, so it accepts timm's kwargs.

    MedITok always uses the tanh GELU and a LayerNorm with eps 1e-6, whatever activation or norm the
    timm block would otherwise ask for; `act_layer` and `norm_layer` are accepted and not used.
    """

    def __init__(self, in_features: int, hidden_features: int, act_layer=None, norm_layer=None,
                 bias: bool = True, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(in_features, eps=1e-6, **dd)
        self.w0 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.w1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.w2 = nn.Linear(hidden_features, in_features, bias=bias, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = F.gelu(self.w0(x), approximate="tanh") * self.w1(x)  # [B, L, hidden]
        return self.drop(self.w2(self.drop(x)))  # [B, L, in]


class CausalAttention(nn.Module):
    """Causal multi-head attention that changes the width from `in_dim` to `out_dim`.

    The heads live in the wider of the two spaces (head width = max(in, out) / num_heads). Going down
    (in > out) the heads are averaged, so the head width must be (or is pooled to) `out_dim`; going up
    the heads are concatenated. q, k, v come from one bias-free linear layer plus a bias made of
    (q_bias, zeros, v_bias), as in the released weights.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int):
        super().__init__()
        inner = max(in_dim, out_dim)
        if inner % num_heads:
            raise ValueError(f"CausalAttention: width {inner} is not divisible by num_heads={num_heads}")
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.head_dim = inner // num_heads
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        # A buffer (saved in the released state dict) so that the k bias stays exactly zero.
        self.register_buffer("zero_k_bias", torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3 * inner]
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, N, head_dim]
        if self.in_dim > self.out_dim:
            x = x.mean(dim=1)  # [B, N, head_dim]
            if self.head_dim != self.out_dim:
                x = F.adaptive_avg_pool1d(x, self.out_dim)  # [B, N, out]
        else:
            x = x.transpose(1, 2).reshape(B, N, -1)  # [B, N, out]
        return self.proj(x)


class AttnProjection(nn.Module):
    """Width-changing block around the quantizer: x = proj(norm3 x) + attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if in_dim % out_dim and out_dim % in_dim:
            raise ValueError(f"AttnProjection: {in_dim} and {out_dim} must divide one another")
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = CausalAttention(in_dim, out_dim, num_heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))  # [B, L, out]
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------
# Convolutional upsampling path of the decoder (feature maps [B, C, H, W])
# ----------------------------------------------------------------------------------------------
class Upsample2d(nn.Module):
    """Nearest-neighbour upsampling by `scale` (1 = none) followed by a 3x3 conv."""

    def __init__(self, dim: int, dim_out: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


class InvMbConvBlock(nn.Module):
    """Inverted MBConv block that can upsample x2: LN2d, 1x1 expand, GELU, [up], dw 3x3, GELU, 1x1, + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, upsample: bool = False, expand_ratio: float = 4.0):
        super().__init__()
        mid = make_divisible(out_chs * expand_ratio)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1)
        self.up = Upsample2d(mid, mid) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = F.gelu(self.conv1_1x1(self.pre_norm(x)))  # [B, mid, H, W]
        x = F.gelu(self.conv2_kxk(self.up(x)))  # [B, mid, H', W']
        return self.conv3_1x1(x) + shortcut  # [B, out, H', W']


class InvStem(nn.Module):
    """Last stage: nearest x2 + 3x3 conv, LayerNorm2d + GELU, 3x3 conv to the image channels."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNorm2d(in_chs, eps=1e-6)
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.norm1(self.conv1(x))))


class ConvUpsampler(nn.Module):
    """Feature map [B, widths[0], h, w] -> image [B, out_chans, h * f, w * f], f = first_scale * 8.

    up_conv1 (upsample by `first_scale` + conv to widths[1]), up_conv2 (depths[0] blocks at widths[1],
    the first upsampling x2), up_conv3 (depths[1] blocks to widths[2], the first upsampling x2),
    up_conv4 (x2, to the image). The released decoder has first_scale 2, i.e. 16x in all.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], out_chans: int = 3,
                 first_scale: int = 2, expand_ratio: float = 4.0):
        super().__init__()
        d0, d1, d2 = embed_dims
        self.up_conv1 = Upsample2d(d0, d1, scale=first_scale)
        self.up_conv2 = nn.Sequential(*[
            InvMbConvBlock(d1, d1, upsample=i == 0, expand_ratio=expand_ratio) for i in range(depths[0])
        ])
        self.up_conv3 = nn.Sequential(*[
            InvMbConvBlock(d1 if i == 0 else d2, d2, upsample=i == 0, expand_ratio=expand_ratio)
            for i in range(depths[1])
        ])
        self.up_conv4 = InvStem(d2, out_chans)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_conv4(self.up_conv3(self.up_conv2(self.up_conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)
