"""MedITok: a ViTamin-based visual tokenizer for medical images, with a multi-codebook cosine quantizer.

image [B, 3, H, W] in [-1, 1]
  -> encoder (timm ViTamin: conv stem / MBConv stages, then ViT blocks)   tokens [B, L, width], L = h * w
  -> quant_proj (causal attention projection)                             [B, L, vocab_width]
  -> quantizer (K cosine codebooks over chunks of vocab_width)            indices [B, K, L]
  -> post_quant_proj                                                      [B, L, width]
  -> decoder (ViT blocks of a second ViTamin, then conv upsampling)       image [B, 3, H, W]
with h = w = img_size // downsample. The alignment head (fc_norm, projection, logit_scale) maps the mean
post-projection token to `embed_dim` for `encode_image`.

`MedITok-L` is the released architecture (`meditok_simple_v1.pth` loads strictly into it); `MedITok-B` uses
ViTamin-B widths; `MedITok-Tiny` is a CPU-sized model built through exactly the same code path.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vitamin import StridedConv, VitCfg, VitConvCfg

from models.checkpoint import (
    CheckpointError,
    atomic_save,
    check_state_dict,
    extract_state_dict,
    load_checkpoint,
)
from models.meditok_blocks import AttnProjection, ConvUpsampler, GeGluMlp
from models.quantizer import MultiCodebookQuantizer


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
DEFAULT_MODEL = "MedITok-L"
DEFAULT_IMG_SIZE = 256  # the released model's training resolution
# The ViTamin stem and its two MBConv stages always halve the image, 8x in all; the final strided
# conv adds another 2x (downsample 16, as released) or keeps the size (downsample 8).
STEM_STRIDE = 8


@dataclass
class MedITokConfig:
    # Encoder / decoder trunk: a timm ViTamin builder whose arguments we override with the fields below.
    timm_model: str = "vitamin_large_256"
    stem_width: int = 160
    conv_widths: tuple[int, int] = (160, 320)  # the two MBConv stages before the ViT
    conv_depths: tuple[int, int] = (2, 4)
    width: int = 1024  # ViT width (encoder and decoder)
    depth: int = 31  # encoder ViT blocks
    num_heads: int = 16
    mlp_ratio: float = 2.0
    # 16: stem, two MBConv stages and the final strided conv each halve the size (the released model).
    # 8: the final conv keeps the size (and the decoder's first upsampling is skipped).
    downsample: int = 2 * STEM_STRIDE
    # Quantizer
    vocab_size: int = 32768  # total over codebooks
    vocab_width: int = 64  # latent width, split evenly over codebooks
    num_codebooks: int = 8
    proj_heads: int = 0  # heads of the attention projections; 0 = width // vocab_width (as released)
    vq_beta: float = 0.25
    use_entropy_loss: bool = False
    entropy_temp: float = 0.01
    # Decoder
    decoder_depth: int = 31  # decoder ViT blocks
    decoder_widths: tuple[int, int] = (320, 160)  # conv upsampling widths after the ViT
    decoder_depths: tuple[int, int] = (4, 2)  # InvMBConv blocks in up_conv2 / up_conv3
    decoder_expand_ratio: float = 4.0
    # Alignment head
    embed_dim: int = 768
    in_chans: int = 3

    def __post_init__(self):
        # JSON / torch.save round trips may turn tuples into lists; keep them hashable and comparable.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        if self.downsample not in (STEM_STRIDE, 2 * STEM_STRIDE):
            raise ValueError(
                f"MedITokConfig.downsample must be {STEM_STRIDE} or {2 * STEM_STRIDE}, got {self.downsample}")
        if self.width % self.vocab_width and self.vocab_width % self.width:
            raise ValueError(f"width={self.width} and vocab_width={self.vocab_width} must divide one another")

    @property
    def codebook_size(self) -> int:
        return self.vocab_size // self.num_codebooks

    @property
    def projection_heads(self) -> int:
        return self.proj_heads or max(self.width // self.vocab_width, 1)

    def grid_size(self, img_size: int) -> int:
        if img_size % self.downsample:
            raise ValueError(f"img_size={img_size} is not a multiple of the downsampling factor {self.downsample}")
        return img_size // self.downsample


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _vitamin(config: MedITokConfig, img_size: int, depth: int) -> nn.Module:
    """A timm ViTamin trunk as MedITok uses it: no class token, no pooling, GeGLU MLPs, zero pos_embed."""
    embed_cfg = VitCfg(
        embed_dim=(*config.conv_widths, config.width),
        depths=(*config.conv_depths, 1),
        stem_width=config.stem_width,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )
    vit = timm.create_model(
        config.timm_model, embed_cfg=embed_cfg, embed_dim=config.width, depth=depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, mlp_layer=GeGluMlp,
        patch_size=1, fc_norm=False, drop_rate=0.0, num_classes=0, global_pool="", pos_embed="none",
        class_token=False, reg_tokens=0, img_size=img_size, in_chans=config.in_chans,
    )
    if config.downsample == STEM_STRIDE:
        # Keep the resolution in the last conv of the stem (timm's ViTamin always strides it by 2).
        # timm's patch_embed.grid_size bookkeeping then reads 16x; nothing here uses it (the grid
        # comes from the config), and with pos_embed="none" timm's forward does not either.
        backbone = vit.patch_embed.backbone
        backbone.pool = StridedConv(stride=1, in_chans=config.conv_widths[-1], embed_dim=config.width)
    # The released model adds a frozen all-zero positional embedding (kept for strict loading).
    vit.pos_embed = nn.Parameter(torch.zeros(1, 1, config.width), requires_grad=False)
    return vit


class ViTDecoder(ConvUpsampler):
    """Tokens [B, L, width] -> ViT blocks -> norm -> [B, width, h, w] -> conv upsampling -> image."""

    def __init__(self, config: MedITokConfig, img_size: int):
        super().__init__(
            (config.width, *config.decoder_widths), config.decoder_depths, out_chans=config.in_chans,
            first_scale=config.downsample // STEM_STRIDE, expand_ratio=config.decoder_expand_ratio,
        )
        vit = _vitamin(config, img_size, config.decoder_depth)
        self.blocks, self.norm_pre, self.norm = vit.blocks, vit.norm_pre, vit.norm

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, L, C = x.shape
        x = self.norm(self.blocks(self.norm_pre(x)))  # [B, L, width]
        x = x.transpose(1, 2).reshape(B, C, *hw)  # [B, width, h, w]
        return self.upsample(x)  # [B, 3, H, W]


class MedITok(nn.Module):
    """The tokenizer at a fixed config and nominal image size (any multiple of config.downsample works)."""

    def __init__(self, config: MedITokConfig, img_size: int = DEFAULT_IMG_SIZE):
        super().__init__()
        self.config, self.img_size = config, img_size
        self.grid_size = config.grid_size(img_size)
        self.in_chans = config.in_chans
        self.num_codebooks, self.vocab_size, self.vocab_width = config.num_codebooks, config.vocab_size, config.vocab_width
        self.codebook_size = config.codebook_size

        self.encoder = _vitamin(config, img_size, config.depth)
        heads = config.projection_heads
        self.quant_proj = AttnProjection(config.width, config.vocab_width, heads)
        self.quantizer = MultiCodebookQuantizer(
            config.vocab_size, config.vocab_width, config.num_codebooks, beta=config.vq_beta,
            use_entropy_loss=config.use_entropy_loss, entropy_temp=config.entropy_temp,
        )
        self.post_quant_proj = AttnProjection(config.vocab_width, config.width, heads)
        self.decoder = ViTDecoder(config, img_size)
        self.fc_norm = nn.LayerNorm(config.width, eps=1e-6)
        self.projection = nn.Linear(config.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # --- shapes ---------------------------------------------------------------------------------
    def _hw(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        d = self.config.downsample
        if H % d or W % d:
            raise ValueError(f"image size {H}x{W} is not a multiple of the downsampling factor {d}")
        return H // d, W // d

    @staticmethod
    def _square_hw(L: int) -> tuple[int, int]:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"{L} tokens do not form a square grid; pass indices as [B, K, h, w]")
        return side, side

    # --- pieces -----------------------------------------------------------------------------------
    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        """image -> pre-quantisation latent [B, L, vocab_width]."""
        return self.quant_proj(self.encoder(x).float())

    def _decode(self, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """quantized latent [B, L, vocab_width] -> image [B, 3, H, W] (not clamped)."""
        return self.decoder(self.post_quant_proj(q), hw)

    # --- public API (names as in the released code) ------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean encoder token [B, width]."""
        return self.encoder(x).mean(dim=1)

    def img_to_idx(self, x: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> indices [B, K, L] (int64)."""
        return self.quantizer.f_to_idx(self._latent(x))

    def idx_to_img(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [B, K, L] or [B, K, h, w] -> image [B, 3, H, W] clamped to [-1, 1]."""
        hw = tuple(idx.shape[-2:]) if idx.dim() == 4 else self._square_hw(idx.shape[-1])
        return self._decode(self.quantizer.idx_to_f(idx), hw).clamp(-1, 1)

    def encode_image_vq(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, L, vocab_width] (the normalised code vectors)."""
        return self.quantizer.idx_to_f(self.img_to_idx(x))

    def latent_to_idx(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, vocab_width, h, w] (or [B, L, vocab_width]) -> indices [B, K, L]."""
        if latent.dim() == 4:
            latent = latent.flatten(2).transpose(1, 2)  # [B, L, vocab_width]
        return self.quantizer.f_to_idx(latent)

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Alignment embedding [B, embed_dim]: mean post-projection token -> fc_norm -> projection."""
        tokens = self.post_quant_proj(self.encode_image_vq(x))  # [B, L, width]
        feats = self.projection(self.fc_norm(tokens.mean(dim=1)))
        return F.normalize(feats, dim=-1) if normalize else feats

    def img_to_reconstructed_img(self, x: torch.Tensor) -> torch.Tensor:
        q, *_ = self.quantizer(self._latent(x))
        return self._decode(q, self._hw(x)).clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step: rec [B, 3, H, W] (unclamped), vq_loss, entropy_loss, usage [K], idx [B, K, L]."""
        q, vq_loss, ent_loss, usage, idx = self.quantizer(self._latent(x))
        rec = self._decode(q, self._hw(x))
        return {"rec": rec, "vq_loss": vq_loss, "entropy_loss": ent_loss, "usage": usage, "idx": idx}


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
MEDITOK_CONFIGS: dict[str, MedITokConfig] = {
    # The released architecture (ViTamin-L trunks, 8 x 4096 codes of width 8): ~697M parameters.
    "MedITok-L": MedITokConfig(),
    # ViTamin-B widths (timm's vitamin_base builder), same quantizer.
    "MedITok-B": MedITokConfig(
        timm_model="vitamin_base_224", stem_width=128, conv_widths=(128, 256), width=768, depth=14,
        num_heads=12, decoder_depth=14, decoder_widths=(256, 128),
    ),
    # CPU-sized (at most ~5M parameters): 8x downsampling so 64 px -> an 8 x 8 grid; a narrow conv
    # decoder, because its full-resolution 3x3 convs dominate the cost of a step.
    "MedITok-Tiny": MedITokConfig(
        timm_model="vitamin_small_224", stem_width=16, conv_widths=(32, 64), conv_depths=(1, 1),
        width=128, depth=2, num_heads=4, downsample=8,
        vocab_size=4096, vocab_width=64, num_codebooks=8,
        # Full-resolution convolutions dominate a CPU step: narrow last decoder stage, no expansion.
        decoder_depth=2, decoder_widths=(64, 16), decoder_depths=(1, 1), decoder_expand_ratio=1.0,
        embed_dim=128,
    ),
}


# ----------------------------------------------------------------------------------------------
# Building, loading, saving
# ----------------------------------------------------------------------------------------------
def infer_config(state_dict: Mapping[str, torch.Tensor]) -> MedITokConfig:
    """Recover the architecture from the shapes of a state dict that does not carry its config."""

    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the MedITok config: key '{key}' is missing from the state dict")
        return tuple(state_dict[key].shape)

    def count(prefix):
        n = {k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)}
        return len([i for i in n if i.isdigit()])

    width = shape("encoder.norm.weight")[0]
    bb = "encoder.patch_embed.backbone."
    stem_width = shape(bb + "stem.conv1.weight")[0]
    conv_widths = (shape(bb + "stages.0.0.conv3_1x1.weight")[0], shape(bb + "stages.1.0.conv3_1x1.weight")[0])
    conv_depths = (count(bb + "stages.0."), count(bb + "stages.1."))
    vocab_width = shape("quant_proj.proj.weight")[0]
    num_codebooks = count("quantizer.codebooks.")
    codebook_size = shape("quantizer.codebooks.0.codebook.weight")[0]
    decoder_widths = (shape("decoder.up_conv1.conv.weight")[0], shape("decoder.up_conv4.conv1.conv.weight")[0])
    mid = shape("decoder.up_conv2.0.conv1_1x1.weight")[0]
    # Head counts and strides leave no trace in shapes: take them from the registered config of the
    # same width (the released model is MedITok-L), else assume ViTamin's 64-wide heads and 16x.
    known = {c.width: c for c in MEDITOK_CONFIGS.values()}
    base = known.get(width, MedITokConfig())
    num_heads = base.num_heads if base.width == width else max(width // 64, 1)
    return replace(
        base,
        stem_width=stem_width, conv_widths=conv_widths, conv_depths=conv_depths, width=width,
        depth=count("encoder.blocks."), num_heads=num_heads,
        downsample=base.downsample if base.width == width else 2 * STEM_STRIDE,
        vocab_size=codebook_size * num_codebooks, vocab_width=vocab_width, num_codebooks=num_codebooks,
        decoder_depth=count("decoder.blocks."), decoder_widths=decoder_widths,
        decoder_depths=(count("decoder.up_conv2."), count("decoder.up_conv3.")),
        decoder_expand_ratio=mid / decoder_widths[0],
        embed_dim=shape("projection.weight")[0], in_chans=shape(bb + "stem.conv1.weight")[1],
    )


def _config_from(ckpt: Any, state_dict: Mapping[str, torch.Tensor]) -> tuple[MedITokConfig, str]:
    """(config, how it was found): stored in our checkpoints, else inferred from the shapes."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("config"), Mapping):
        known = {f.name for f in fields(MedITokConfig)}
        stored = dict(ckpt["config"])
        unknown = sorted(set(stored) - known)
        if unknown:
            raise CheckpointError(f"checkpoint config has fields this code does not know: {unknown}")
        return MedITokConfig(**stored), "stored in the checkpoint"
    return infer_config(state_dict), "inferred from the state-dict shapes"


def build_meditok(ckpt_path: str | os.PathLike | None = None, img_size: int | None = None,
                  model_name: str | None = None, device: str | torch.device = "cpu",
                  prefer_ema: bool = True, **overrides) -> MedITok:
    """Build a MedITok, optionally loading weights strictly from `ckpt_path`.

    Without a path: the registered `model_name` (default MedITok-L) with random weights.
    `ckpt_path`: a file (.pth/.pt, or .safetensors read without pickle) or an hf://<org>/<repo>/<file>
    reference (models.checkpoint.resolve_weights).
    With a path: the config stored in the checkpoint (ours), else `model_name`'s config, else one
    inferred from the shapes (the released plain state dict); weights under "ema" are preferred over
    "model"/"state_dict" unless `prefer_ema=False`. The model is built on the meta device and the
    tensors assigned, so no time goes into random initialisation. `overrides` replace config fields.
    Returned in eval mode.
    """
    if model_name is not None and model_name not in MEDITOK_CONFIGS:
        raise ValueError(f"unknown MedITok model '{model_name}'; choose from {list(MEDITOK_CONFIGS)}")
    if ckpt_path is None:
        config = replace(MEDITOK_CONFIGS[model_name or DEFAULT_MODEL], **overrides)
        with torch.device(device):
            model = MedITok(config, img_size or DEFAULT_IMG_SIZE)
        return model.eval()

    ckpt = load_checkpoint(ckpt_path, map_location=device)
    order = ("ema", "model", "state_dict", "module") if prefer_ema else ("model", "state_dict", "module", "ema")
    state_dict, where = extract_state_dict(ckpt, prefer=order)
    if model_name is not None and not (isinstance(ckpt, Mapping) and "config" in ckpt):
        config, how = MEDITOK_CONFIGS[model_name], f"registered config {model_name}"
    else:
        config, how = _config_from(ckpt, state_dict)
    config = replace(config, **overrides)
    stored_size = ckpt.get("img_size") if isinstance(ckpt, Mapping) else None
    img_size = img_size or (int(stored_size) if isinstance(stored_size, int) else DEFAULT_IMG_SIZE)
    with torch.device("meta"):
        model = MedITok(config, img_size)
    context = f"{ckpt_path}{f' [{where}]' if where else ''}; config {how}: {config}"
    check_state_dict(model, state_dict, context)
    # Loaded tensors must be real (not meta) and on `device`; assign keeps them without copying.
    state_dict = {k: v.to(device) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)  # keeps each parameter's requires_grad
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{ckpt_path}: tensors left uninitialised after loading: {left_on_meta[:10]}")
    return model.eval()


def save_meditok(model: MedITok, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
    """Write a self-describing checkpoint atomically: kind, config, img_size, weights, plus `extra`
    (e.g. "ema": state dict, "step", "optimizer"); build_meditok(path) rebuilds the model from it alone."""
    ckpt = {
        "kind": "meditok",
        "config": asdict(model.config),
        "img_size": int(model.img_size),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    ckpt.update(extra or {})
    atomic_save(ckpt, path)
