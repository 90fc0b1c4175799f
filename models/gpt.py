"""Class-to-image GPT (LlamaGen style) with MedITok's multi-codebook autoregressive head.

An image is a grid of L = h*w positions; each position holds K codes (one per sub-codebook of
`vocab_size // K` entries). The sequence fed to the main stack is

    [cond x T, sum_k e_k(c_0^k), ..., sum_k e_k(c_{L-2}^k)]        (T = cls_token_num)

and the hidden state at position T-1+t predicts position t. The prediction of the K codes of one
position is itself autoregressive: a short causal sequence [h_t, e'_0(c_t^0), ..., e'_{K-2}(c_t^{K-2})]
runs through `n_output_layer` blocks (no rotary), a RMSNorm and one shared `linear_head`.

Key names, shapes and arithmetic follow the released MedITok GPT (so its checkpoints load strictly and
compute the same function); generation lives in `models/generate.py`.

Layout: config -> small modules -> head -> Transformer -> size registry -> loading.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_strict
from models.meditok_blocks import AttnProjection
from models.quantizer import MultiCodebookQuantizer
from models.text_encoder import WordTextEncoder


COND_ROTATIONS = ("zero", "identity")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """LlamaGen's field names and defaults, so that official configs load as-is."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None  # None: plain multi-head attention; fewer: grouped-query attention
    n_output_layer: int = 1  # blocks in the per-position multi-codebook head
    multiple_of: int = 256  # SwiGLU hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_codebooks: int = 8
    num_classes: int = 1000
    caption_dim: int = 2048  # t2i: width of the caption features (T5-XL: 2048)
    class_dropout_prob: float = 0.1  # > 0 adds the null class / null caption used by guidance
    model_type: str = "c2i"  # "c2i": class label; "t2i": caption features [cls_token_num, caption_dim]
    text_vocab_size: int = 0  # t2i: > 0 builds the word-level text encoder trained with the GPT (models/text_encoder.py)
    text_layers: int = 0  # bidirectional blocks of that text encoder (0: word + position embeddings, see its module)

    vocab_size: int = 16384  # total over codebooks: each codebook has vocab_size // num_codebooks entries
    cls_token_num: int = 1  # condition positions before the image tokens
    # Rotary rows of the condition positions: "zero" (LlamaGen, the released weights) zeroes their queries
    # and keys, so attention to them ignores their content: an image token sees the mean of the caption's
    # positions, where a differing word is diluted by the shared ones. "identity" keeps queries and keys
    # unrotated: attention picks caption positions by content (word order comes from the text features).
    # None: "zero" for c2i (one class position: no difference), "identity" for t2i.
    cond_rotation: Optional[str] = None
    block_size: int = 256  # image positions L = grid_size ** 2
    max_batch_size: int = 32  # kept for config compatibility (caches are sized per generate() call)
    max_seq_len: int = 2048  # kept for config compatibility
    # Token embeddings from the tokenizer (`--vq-embed-path`, VQTokenEmbedder): > 0 is the width of its
    # post_quant_proj output; 0 = one embedding table per codebook (TokenEmbedder).
    vq_embed_width: int = 0
    vq_embed_vocab_width: int = 0  # the tokenizer's quantizer latent width (split over the codebooks)
    vq_embed_heads: int = 0  # heads of its post_quant_proj attention
    vq_embed_path: Optional[str] = None  # the file those tokenizer weights came from (a record only)

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type={self.model_type!r}: choose 'c2i' (class label) or 't2i' (caption)")
        if self.text_vocab_size and self.model_type != "t2i":
            raise ValueError(f"text_vocab_size={self.text_vocab_size} needs model_type='t2i'")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.vocab_size % self.num_codebooks:
            raise ValueError(f"vocab_size={self.vocab_size} is not divisible by num_codebooks={self.num_codebooks}")
        if self.grid_size ** 2 != self.block_size:
            raise ValueError(f"block_size={self.block_size} is not a square grid (h*w with h == w)")
        if self.cls_token_num < 1:
            raise ValueError(f"cls_token_num={self.cls_token_num} must be at least 1")
        if self.cond_rotation is None:
            self.cond_rotation = "identity" if self.model_type == "t2i" else "zero"
        if self.cond_rotation not in COND_ROTATIONS:
            raise ValueError(f"cond_rotation={self.cond_rotation!r}: choose from {COND_ROTATIONS}")
        if self.vq_embed_width and (self.vq_embed_vocab_width % self.num_codebooks or self.vq_embed_heads < 1):
            raise ValueError(f"vq_embed_vocab_width={self.vq_embed_vocab_width} must split over num_codebooks="
                             f"{self.num_codebooks} and vq_embed_heads={self.vq_embed_heads} must be >= 1")

    # Derived values (properties, so asdict() holds only the fields above).
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def sub_vocab_size(self) -> int:
        return self.vocab_size // self.num_codebooks

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


# ----------------------------------------------------------------------------------------------
# 2-D rotary embedding
# ----------------------------------------------------------------------------------------------
def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int,
                            cond_rotation: str = "zero") -> torch.Tensor:
    """Rotation table [cls_token_num + grid_size**2, head_dim // 2, 2] holding (cos, sin).

    Half of the rotated pairs turn with the row index, half with the column index. The condition
    positions get cond_rotation (see ModelArgs): "zero", an all-zero table (as in LlamaGen), which zeroes
    their queries and keys; "identity", (cos, sin) = (1, 0), which leaves them unrotated.
    Always built on the CPU in float32, whatever the default device (meta builds included).
    """
    quarter = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(0, quarter, device="cpu").float() * 2 / (head_dim // 2)))
    pos = torch.arange(grid_size, device="cpu").float()
    angles = torch.outer(pos, freqs)  # [g, head_dim // 4]
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    ).flatten(0, 1)  # [g*g, head_dim // 2]: (row angles, column angles)
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1)
    cond = torch.zeros(cls_token_num, head_dim // 2, 2, device="cpu")
    if cond_rotation == "identity":
        cond[..., 0] = 1.0
    elif cond_rotation != "zero":
        raise ValueError(f"cond_rotation={cond_rotation!r}: choose from {COND_ROTATIONS}")
    return torch.cat([cond, table])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, head_dim] rotated pairwise by freqs_cis [S, head_dim // 2, 2] (cos, sin), in float32.
    As a complex product: one kernel instead of a dozen small real ones (same numbers; bench/bench_generate.py);
    torch.compile supports it."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, S, H, head_dim // 2]
    fc = torch.view_as_complex(freqs_cis.contiguous())[None, :, None]  # [1, S, 1, head_dim // 2]
    return torch.view_as_real(xc * fc).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, then the weight in x's dtype (as LlamaGen); the fused
        # op gives the same bits as the four-op formula on the CPU and is one dispatch instead of five.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Fixed-shape key/value cache [B, n_kv_head, S_max, head_dim], written in place.

    Non-persistent buffers: caches never enter a state dict, so checkpoints stay strict."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos [S], k/v [B, n_kv_head, S, head_dim]; returns the whole caches (masked by the caller).
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None  # set by Transformer.setup_caches for generation

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None, kv_len=None):
        # x [B, S, dim]; freqs_cis [S, head_dim // 2, 2] or None (the head has no rotary);
        # with a cache: input_pos [S] cache slots to write, mask [S, S_max] or per row [B, 1, S, S_max]
        # (True = attend; without a cache a given mask is [B, 1, S, S]), and
        # optionally kv_len (int): attend to slots < kv_len only. Eager decoding passes it so that
        # attention reads the filled prefix rather than the whole fixed-size cache (half as many
        # bytes on average); compiled decoding leaves it None to keep shapes fixed.
        B, S, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([q_dim + kv_dim, kv_dim], dim=-1)
        qk = qk.view(B, S, self.n_head + self.n_kv_head, self.head_dim)
        if freqs_cis is not None:
            qk = apply_rotary_emb(qk, freqs_cis)  # queries and keys in one pass
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        v = v.view(B, S, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, head_dim]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, S_max, head_dim]
            if kv_len is not None:
                k, v, mask = k[:, :, :kv_len], v[:, :, :kv_len], mask[..., :kv_len]
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # [B, H, S, head_dim]
        out = out.transpose(1, 2).reshape(B, S, q_dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, drop_path_p: float = 0.0):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path_p = drop_path_p

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None, kv_len=None):
        a = self.attention(self.attention_norm(x), freqs_cis, input_pos, mask, kv_len)
        h = x + drop_path(a, self.drop_path_p, self.training)
        return h + drop_path(self.feed_forward(self.ffn_norm(h)), self.drop_path_p, self.training)


class LabelEmbedder(nn.Module):
    """Class label -> [B, 1, dim]. With class_dropout_prob > 0 the table has a last, null row (guidance)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    """fc2(gelu_tanh(fc1 x)), bias-free (LlamaGen's caption projection)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> [B, T, dim] through `cap_proj`.

    `uncond_embedding` [T, caption_dim] is the null caption used by guidance: in training a caption is
    replaced by it with probability uncond_prob (its padding mask is kept, as in LlamaGen). Key names
    follow LlamaGen's CaptionEmbedder; here the null caption is a learned parameter (LlamaGen keeps its
    random initial value as a buffer; the state-dict key is the same, so both load)."""

    def __init__(self, caption_dim: int, dim: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.uncond_embedding = nn.Parameter(torch.randn(token_num, caption_dim) / caption_dim ** 0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        # caption [B, T, caption_dim]; drop [B] bool: rows forced to the null caption (guidance)
        if caption.shape[1:] != self.uncond_embedding.shape:
            raise ValueError(f"caption features {tuple(caption.shape)}, the model expects [B, {self.uncond_embedding.shape[0]}, "
                             f"{self.uncond_embedding.shape[1]}] (cls_token_num, caption_dim)")
        caption = caption.to(self.uncond_embedding.dtype)
        if train and self.uncond_prob > 0:
            random_drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            drop = random_drop if drop is None else drop | random_drop
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption)


def condition_mask(cond_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Attention mask [B, 1, S, S] (True = attend) for a sequence whose first T positions are a caption
    with padding mask cond_mask [B, T]: causal, no query attends to a padded caption position, and each
    position attends to itself (so padded rows, whose outputs nobody reads, stay finite)."""
    B, T = cond_mask.shape
    keys = torch.cat([cond_mask.bool(), cond_mask.new_ones(B, seq_len - T, dtype=torch.bool)], dim=1)  # [B, S]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=cond_mask.device).tril()
    eye = torch.eye(seq_len, dtype=torch.bool, device=cond_mask.device)
    return ((causal & keys[:, None, :]) | eye)[:, None]


class TokenEmbedder(nn.Module):
    """Codes [B, K, S] -> [B, S, dim]: one table per codebook, summed over codebooks."""

    def __init__(self, vocab_size: int, dim: int, num_codebooks: int):
        super().__init__()
        self.codebooks = nn.ModuleList(nn.Embedding(vocab_size // num_codebooks, dim) for _ in range(num_codebooks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[1] != len(self.codebooks):
            raise ValueError(f"codes have {codes.shape[1]} codebooks, the model expects {len(self.codebooks)}")
        out = self.codebooks[0](codes[:, 0])
        for k in range(1, len(self.codebooks)):
            out = out + self.codebooks[k](codes[:, k])
        return out


class VQTokenEmbedder(nn.Module):
    """Codes [B, K, S] -> [B, S, dim] through the tokenizer itself (the released `--vq-embed-path` variant):
    its quantizer's normalised code vectors [B, S, vocab_width], its post_quant_proj [B, S, width], then a
    trained LayerNorm-Linear-GELU-Linear `mm_projector` to the GPT width. Key names follow the released GPT
    (tok_embeddings.quantizer.*, tok_embeddings.post_quant_proj.*, tok_embeddings.mm_projector.{0,1,3}.*).

    The tokenizer part stays frozen (no gradients, not in the optimizer): the GPT reads the tokenizer's
    own features, and training never pays for backpropagating through them. post_quant_proj attends
    causally over the positions, so position s sees codes 0..s; during cached generation the embedder
    keeps the codes decoded so far (`start_decoding`) so every position gets the embedding it had in
    training (the released sampler embeds each new position alone)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.num_codebooks = config.num_codebooks
        self.quantizer = MultiCodebookQuantizer(config.vocab_size, config.vq_embed_vocab_width, config.num_codebooks)
        self.post_quant_proj = AttnProjection(config.vq_embed_vocab_width, config.vq_embed_width, config.vq_embed_heads)
        self.quantizer.requires_grad_(False)
        self.post_quant_proj.requires_grad_(False)
        self.post_quant_proj.attn.qkv.prepack = False  # CausalAttention reads qkv.weight (models/generate.py)
        self.mm_projector = nn.Sequential(
            nn.LayerNorm(config.vq_embed_width, eps=1e-6),
            nn.Linear(config.vq_embed_width, config.dim),
            nn.GELU(),
            nn.Linear(config.dim, config.dim),
        )
        self.decoding = False  # set by Transformer.setup_caches / clear_caches
        self.history: Optional[torch.Tensor] = None  # codes [B, K, s] fed so far while decoding

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, S] -> the tokenizer's post-quantisation features [B, S, width] (frozen)."""
        if codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks, the model expects {self.num_codebooks}")
        with torch.no_grad():
            f = self.quantizer.idx_to_f(codes)  # [B, S, vocab_width] float32
            return self.post_quant_proj(f.to(self.post_quant_proj.norm1.weight.dtype))

    def load_tokenizer(self, part: dict, context: str = "") -> None:
        """Load the tokenizer part strictly from `load_vq_embedding`'s state dict (quantizer.*, post_quant_proj.*)."""
        for name in ("quantizer", "post_quant_proj"):
            sub = {k[len(name) + 1:]: v for k, v in part.items() if k.startswith(name + ".")}
            load_state_dict_strict(getattr(self, name), sub, context=f"{context} [{name}]")

    def start_decoding(self) -> None:
        self.history, self.decoding = None, True

    def stop_decoding(self) -> None:
        self.history, self.decoding = None, False

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.decoding:  # one new position; guidance may have dropped the uncond half of the batch since
            prev = self.history[: codes.shape[0]] if self.history is not None else codes[:, :, :0]
            self.history = torch.cat([prev, codes], dim=2)  # [B, K, s]
            return self.mm_projector(self.features(self.history)[:, -codes.shape[2]:])
        return self.mm_projector(self.features(codes))


# ----------------------------------------------------------------------------------------------
# The multi-codebook head
# ----------------------------------------------------------------------------------------------
class AutoRegressiveHead(nn.Module):
    """Predicts the K codes of one position from its hidden state, codebook by codebook."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.num_codebooks = config.num_codebooks
        self.codebooks = nn.ModuleList(
            nn.Embedding(config.sub_vocab_size, config.dim) for _ in range(config.num_codebooks - 1)
        )
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_output_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.linear_head = nn.Linear(config.dim, config.sub_vocab_size)

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: h [B, L, dim], codes [B, K, L] (only codebooks 0..K-2 are read)
        -> logits [B, L, K, sub_vocab] (position-major; Transformer.forward permutes)."""
        B, L, D = h.shape
        K = self.num_codebooks
        seq = [h] + [self.codebooks[k](codes[:, k]) for k in range(K - 1)]  # K x [B, L, dim]
        x = torch.stack(seq, dim=2).reshape(B * L, K, D)  # one short causal sequence per position
        for layer in self.layers:
            x = layer(x)
        return self.linear_head(self.norm(x)).view(B, L, K, -1)

    def step(self, x: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cached decoding of one head slot: x [B, 1, dim] (h_t at slot 0, else the previous code's
        embedding), input_pos [1], mask [1, K] -> logits [B, sub_vocab]. Needs Transformer.setup_caches."""
        for layer in self.layers:
            x = layer(x, None, input_pos, mask)
        return self.linear_head(self.norm(x[:, 0]))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.num_codebooks = config.num_codebooks
        self.num_classes = config.num_classes
        self.cls_token_num = config.cls_token_num
        self.block_size = config.block_size

        if config.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob, config.cls_token_num)
            self.text_encoder = WordTextEncoder(config.text_vocab_size, config.caption_dim, config.cls_token_num,
                                                config.text_layers, dropout=config.resid_dropout_p) if config.text_vocab_size else None
        else:
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = (VQTokenEmbedder(config) if config.vq_embed_width
                               else TokenEmbedder(config.vocab_size, config.dim, config.num_codebooks))
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        dpr = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, p) for p in dpr)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = AutoRegressiveHead(config)

        # Plain attribute, not a buffer: it stays float32 when the weights are cast, stays out of
        # state dicts, and survives meta-device construction. Moved to the input's device on use.
        self.freqs_cis = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num,
                                                 config.cond_rotation)
        self.initialize_weights()

    # -- init ------------------------------------------------------------------------------------
    def initialize_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.linear_head.weight)  # start from uniform code predictions

    def rope(self, device) -> torch.Tensor:
        if self.freqs_cis.device != torch.device(device):
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    # -- condition ---------------------------------------------------------------------------------
    def embed_condition(self, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None,
                        drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The condition positions [B, T, dim]. c2i: cond = labels [B]. t2i: cond = caption features
        [B, T, caption_dim], or word ids [B, T] when the model has its own text encoder; cond_mask [B, T]
        marks the real caption positions. drop [B] bool: rows replaced by the null class / caption.
        In train mode the class or caption is also dropped at random (class_dropout_prob)."""
        T = self.cls_token_num
        if self.config.model_type == "c2i":
            if drop is not None:
                cond = torch.where(drop, self.num_classes, cond)
            return self.cls_embedding(cond, train=self.training).expand(-1, T, -1)
        if self.text_encoder is not None:
            if cond.dtype.is_floating_point:
                raise ValueError("this t2i model has its own text encoder: cond must be word ids [B, T], not features")
            cond = self.text_encoder(cond, cond_mask)  # [B, T, caption_dim]
        elif not cond.dtype.is_floating_point:
            raise ValueError("this t2i model reads caption features [B, T, caption_dim]; got integer ids")
        return self.cls_embedding(cond, train=self.training, drop=drop)

    # -- teacher forcing -------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, cond_idx: torch.Tensor, cond_mask: Optional[torch.Tensor] = None,
               drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Main stack without caches: idx [B, K, L'] codes (L' may be 0), cond_idx the condition (see
        `embed_condition`) -> normed hidden states [B, L'+1, dim]; row t predicts image position t."""
        T = self.cls_token_num
        cond = self.embed_condition(cond_idx, cond_mask, drop)  # [B, T, dim]
        x = torch.cat([cond, self.tok_embeddings(idx)], dim=1) if idx.shape[-1] else cond  # [B, T+L', dim]
        x = self.tok_dropout(x)
        S = x.shape[1]
        if S > T + self.block_size - 1:
            raise ValueError(f"{idx.shape[-1]} input positions exceed block_size - 1 = {self.block_size - 1}")
        freqs = self.rope(x.device)[:S]
        mask = None if cond_mask is None else condition_mask(cond_mask.to(x.device), S)  # None: plain causal
        for layer in self.layers:
            x = layer(x, freqs, mask=mask)
        return self.norm(x)[:, T - 1:]  # [B, L'+1, dim]

    def forward(self, idx: torch.Tensor, cond_idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None):
        """idx [B, K, L-1] codes, cond_idx [B] labels (c2i) or a caption (t2i, see `embed_condition`),
        targets [B, K, L] or None, cond_mask [B, T] (t2i: True at real caption positions; None: all real)
        -> (logits [B, K, L, vocab_size // K], mean cross-entropy or None).

        Same function in train and eval mode (train mode adds the dropouts and the label dropout).
        Without targets the head is fed its own argmax codes (greedy, uncached): slow, for checks."""
        h = self.hidden(idx, cond_idx, cond_mask)  # [B, L, dim]
        if targets is None:
            return self._greedy_head_logits(h), None
        if targets.shape[-1] != h.shape[1]:
            raise ValueError(f"targets cover {targets.shape[-1]} positions, expected idx positions + 1 = {h.shape[1]}")
        logits = self.output(h, targets)  # [B, L, K, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.transpose(1, 2).reshape(-1))
        return logits.permute(0, 2, 1, 3), loss  # a [B, K, L, V] view

    def _greedy_head_logits(self, h: torch.Tensor) -> torch.Tensor:
        # Codebook k's logits only depend on codes < k (causal head), so K passes fill them in order.
        B, L, _ = h.shape
        codes = torch.zeros(B, self.num_codebooks, L, dtype=torch.long, device=h.device)
        for k in range(self.num_codebooks):
            logits = self.output(h, codes)  # [B, L, K, V]
            codes[:, k] = logits[:, :, k].argmax(-1)
        return logits.permute(0, 2, 1, 3)

    # -- caches for generation (see models/generate.py) ------------------------------------------
    def setup_caches(self, batch_size: int, max_seq_len: int, dtype=None, device=None, cond_mask=None):
        """Allocate fixed-shape KV caches once per generate() call: main stack [B, H_kv, max_seq_len, hd],
        head [B, H_kv, K, hd], plus the boolean causal masks and slot indices used to address them.
        cond_mask [B, T] (t2i captions with padding): the main mask becomes per row [B, 1, S_max, S_max]."""
        ref = self.norm.weight  # (the linears may be swapped for packed copies while sampling)
        dtype, device = dtype or ref.dtype, device or ref.device
        c = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, c.kv_heads, c.head_dim, dtype, device)
        for layer in self.output.layers:
            layer.attention.kv_cache = KVCache(batch_size, c.num_codebooks, c.kv_heads, c.head_dim, dtype, device)
        if cond_mask is None:
            self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()
        else:
            self.causal_mask = condition_mask(cond_mask.to(device), max_seq_len)
        self.head_mask = torch.ones(c.num_codebooks, c.num_codebooks, dtype=torch.bool, device=device).tril()
        # Slot indices made once: slicing them per step allocates nothing.
        self.seq_pos = torch.arange(max_seq_len, device=device)
        self.head_pos = torch.arange(c.num_codebooks, device=device)[:, None]  # [K, 1]
        if isinstance(self.tok_embeddings, VQTokenEmbedder):
            self.tok_embeddings.start_decoding()

    def clear_caches(self):
        for layer in list(self.layers) + list(self.output.layers):
            layer.attention.kv_cache = None
        self.causal_mask = self.head_mask = self.seq_pos = self.head_pos = None
        if isinstance(self.tok_embeddings, VQTokenEmbedder):
            self.tok_embeddings.stop_decoding()

    def step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """Cached main stack: x [B, S, dim] embeddings at sequence slots input_pos [S]
        -> normed hidden state of the last slot [B, dim]. kv_len: see Attention.forward."""
        mask = self.causal_mask[..., input_pos, :]  # [S, S_max] or per row [B, 1, S, S_max]
        freqs = self.rope(x.device)[input_pos]
        for layer in self.layers:
            x = layer(x, freqs, input_pos, mask, kv_len)
        return self.norm(x[:, -1])


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
GPT_SIZES = {
    "GPT-Tiny": dict(n_layer=4, n_head=4, dim=128),  # ~1.3M non-embedding parameters (CPU tests)
    "GPT-Small": dict(n_layer=6, n_head=6, dim=384),  # ~12M non-embedding parameters (CPU runs)
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
}


def _build(name: str, **kwargs) -> Transformer:
    return Transformer(ModelArgs(**{**GPT_SIZES[name], **kwargs}))


def GPT_Tiny(**kwargs): return _build("GPT-Tiny", **kwargs)  # noqa: E704
def GPT_Small(**kwargs): return _build("GPT-Small", **kwargs)  # noqa: E704
def GPT_B(**kwargs): return _build("GPT-B", **kwargs)  # noqa: E704
def GPT_L(**kwargs): return _build("GPT-L", **kwargs)  # noqa: E704
def GPT_XL(**kwargs): return _build("GPT-XL", **kwargs)  # noqa: E704
def GPT_XXL(**kwargs): return _build("GPT-XXL", **kwargs)  # noqa: E704
def GPT_XXXL(**kwargs): return _build("GPT-XXXL", **kwargs)  # noqa: E704


GPT_models = {
    "GPT-Tiny": GPT_Tiny, "GPT-Small": GPT_Small, "GPT-B": GPT_B, "GPT-L": GPT_L,
    "GPT-XL": GPT_XL, "GPT-XXL": GPT_XXL, "GPT-XXXL": GPT_XXXL,
}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _count(sd, prefix: str, suffix: str) -> int:
    n = 0
    while f"{prefix}{n}{suffix}" in sd:
        n += 1
    return n


def infer_config(sd: dict, **overrides) -> dict:
    """ModelArgs fields from a state dict without a config (the released GPT-B layout).

    From shapes: dim, n_layer, n_output_layer, num_codebooks, vocab_size, num_classes (the label table
    is assumed to carry the null row), n_kv_head, the SwiGLU width. n_head comes from the registry
    size with the same dim unless given; cls_token_num and block_size keep their defaults
    (1 and 256) unless given. A caption projection (`cls_embedding.cap_proj`) makes it a t2i model:
    caption_dim and cls_token_num come from the null caption [T, caption_dim], and a word-level text
    encoder (`text_encoder.*`) gives text_vocab_size and text_layers. Token embeddings from the tokenizer
    (`tok_embeddings.quantizer.*`, the released --vq-embed-path GPT) give the vq_embed_* fields."""
    t2i = "cls_embedding.cap_proj.fc1.weight" in sd
    vq = VQ_EMBED_KEY in sd
    cond_keys = ["cls_embedding.cap_proj.fc1.weight", "cls_embedding.uncond_embedding"] if t2i else ["cls_embedding.embedding_table.weight"]
    tok_keys = [VQ_EMBED_KEY, "tok_embeddings.post_quant_proj.proj.weight"] if vq else ["tok_embeddings.codebooks.0.weight"]
    need = tok_keys + ["layers.0.attention.wqkv.weight"] + cond_keys
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"cannot infer a GPT config: state dict lacks {missing}")
    dim = sd["layers.0.attention.wqkv.weight"].shape[1]
    if vq:
        sub_vocab = sd[VQ_EMBED_KEY].shape[0]
        K = _count(sd, "tok_embeddings.quantizer.codebooks.", ".codebook.weight")
    else:
        sub_vocab = sd["tok_embeddings.codebooks.0.weight"].shape[0]
        K = _count(sd, "tok_embeddings.codebooks.", ".weight")
    cfg = dict(
        dim=dim,
        n_layer=_count(sd, "layers.", ".attention.wqkv.weight"),
        n_output_layer=_count(sd, "output.layers.", ".attention.wqkv.weight"),
        num_codebooks=K,
        vocab_size=sub_vocab * K,
        class_dropout_prob=0.1,
        cls_token_num=1,
        block_size=256,
        cond_rotation="zero",  # the released and LlamaGen layouts were trained so
    )
    if t2i:
        cfg["cls_token_num"], cfg["caption_dim"] = sd["cls_embedding.uncond_embedding"].shape
        cfg["model_type"] = "t2i"
        if "text_encoder.word_embeddings.weight" in sd:
            cfg["text_vocab_size"] = sd["text_encoder.word_embeddings.weight"].shape[0]
            cfg["text_layers"] = _count(sd, "text_encoder.blocks.", ".qkv.weight")
    else:
        cfg["num_classes"] = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    if vq:
        cfg.update(vq_embed_dims(sd, "tok_embeddings."))
    if "n_head" not in overrides:
        by_dim = {s["dim"]: s["n_head"] for s in GPT_SIZES.values()}
        if dim not in by_dim:
            raise CheckpointError(f"cannot infer n_head for dim={dim} (registry dims: {sorted(by_dim)}); pass n_head=...")
        cfg["n_head"] = by_dim[dim]
    cfg.update(overrides)
    head_dim = dim // cfg["n_head"]
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0] // head_dim
    n_kv = (qkv_rows - cfg["n_head"]) // 2
    if "n_kv_head" not in overrides:
        cfg["n_kv_head"] = None if n_kv == cfg["n_head"] else n_kv
    if "multiple_of" not in overrides and "ffn_dim_multiplier" not in overrides:
        hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
        base = int(2 * 4 * dim / 3)
        if find_multiple(base, ModelArgs.multiple_of) != hidden:
            if hidden < base:
                raise CheckpointError(f"SwiGLU width {hidden} < {base}: pass ffn_dim_multiplier/multiple_of")
            cfg["multiple_of"] = hidden  # find_multiple(base, hidden) == hidden when base <= hidden
    return cfg


VQ_EMBED_KEY = "tok_embeddings.quantizer.codebooks.0.codebook.weight"  # present only in a VQTokenEmbedder GPT


def vq_embed_dims(sd: dict, prefix: str = "", config: Optional[dict] = None) -> dict:
    """The vq_embed_* ModelArgs fields from a tokenizer's post_quant_proj weights under `prefix`.
    Its head count leaves no trace in shapes: `config["proj_heads"]` (a MedITok config) when set, else
    width // vocab_width, the MedITok rule (16 for the released tokenizer)."""
    width, vocab_width = sd[f"{prefix}post_quant_proj.proj.weight"].shape
    heads = int((config or {}).get("proj_heads") or 0) or max(width // vocab_width, 1)
    return dict(vq_embed_width=int(width), vq_embed_vocab_width=int(vocab_width), vq_embed_heads=heads)


def load_vq_embedding(path) -> tuple[dict, dict]:
    """The tokenizer part of a VQTokenEmbedder from a tokenizer checkpoint: ours (weights under "ema" or
    "model", config inside), the released plain state dict (meditok_simple_v1.pth) or the released
    trainer format (weights under ["trainer"]["unitok"]). Returns (state dict of its quantizer.* and
    post_quant_proj.* tensors, the vq_embed_* ModelArgs fields)."""
    ckpt = load_checkpoint(path)
    trainer = ckpt.get("trainer") if isinstance(ckpt, dict) else None
    if isinstance(trainer, dict) and "unitok" in trainer:
        sd, config = dict(trainer["unitok"]), None
    else:
        sd, _ = extract_state_dict(ckpt, prefer=("ema", "model", "state_dict", "module"))
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
    part = {k: v for k, v in sd.items() if k.startswith(("quantizer.", "post_quant_proj."))}
    if "quantizer.codebooks.0.codebook.weight" not in part or "post_quant_proj.proj.weight" not in part:
        raise CheckpointError(f"{path}: not a MedITok tokenizer checkpoint (no quantizer.codebooks.* / "
                              f"post_quant_proj.* weights); keys start with {sorted(sd)[:5]}")
    return part, vq_embed_dims(part, config=config if isinstance(config, dict) else None)


def load_gpt(path, prefer_ema: bool = True, **overrides):
    """Load a GPT checkpoint strictly -> (model in eval mode, raw checkpoint dict). `path`: a file
    (.pt, or .safetensors from `python -m models.export`) or an hf://<org>/<repo>/<file> reference.

    Our checkpoints hold {"config": asdict(ModelArgs), "model": ..., "ema": ... (optional)};
    with prefer_ema the EMA weights are used when present. The released MedITok GPT-B holds its
    weights under "model" and no config: the config is inferred from the shapes (`infer_config`).
    `overrides` replace config fields (e.g. block_size=64, cls_token_num=...)."""
    ckpt = load_checkpoint(path)
    prefer = ("ema", "model") if prefer_ema else ("model", "ema")
    sd, where = extract_state_dict(ckpt, prefer=prefer + ("state_dict", "module"))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        cfg = dict(ckpt["config"])
        known = {f.name for f in fields(ModelArgs)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise CheckpointError(f"{path}: config has fields ModelArgs does not know: {unknown}")
        cfg.setdefault("cond_rotation", "zero")  # a checkpoint from before the field was trained so
        cfg.update(overrides)
    else:
        cfg = infer_config(sd, **overrides)
    config = ModelArgs(**cfg)
    with torch.device("meta"):
        model = Transformer(config)
    load_state_dict_strict(model, sd, context=f"{path} [{where or 'plain'}] as {asdict(config)}", assign=True)
    return model.eval(), ckpt
