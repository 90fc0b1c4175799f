"""Sampling from the GPT (class- or text-conditioned) with KV caches and classifier-free guidance.

Structure (as gpt-fast): `generate` allocates the caches once per call with fixed shapes, `prefill`
runs the condition positions, `decode_one_token` runs one image position (main stack step + the K
head steps), `decode_n_tokens` loops. Every step writes into the preallocated caches in place. With
compile=True it reads them whole through a boolean causal mask, so shapes never change; eager decoding
reads only the filled prefix. On a CPU the linear weights are prepacked for oneDNN (`PackedLinear`).

Guidance follows the released MedITok sampler: with cfg_scale > 1 the batch is doubled with the null
class; at every head step `logits = uncond + (cond - uncond) * scale`; the index drawn from the guided
logits is fed to both halves; after position `cfg_interval + 1` (when cfg_interval >= 0) the cond
logits are used alone. `generate_naive` is the same sampler without any cache (the whole prefix is
recomputed for every position and every codebook): a reference for tests and the speed baseline.

Text-to-image models (model_type "t2i") take caption features [B, T, caption_dim] (or word ids [B, T]
for a model with its own text encoder) and a padding mask [B, T] instead of labels; the null caption
replaces the caption in the unconditional half and keeps its mask (as LlamaGen).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CFG_SCHEDULES = ("constant", "linear")


# ----------------------------------------------------------------------------------------------
# Sampling one code per row
# ----------------------------------------------------------------------------------------------
def _keep_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    return sorted_probs.masked_fill(before > top_p, 0.0)


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row of unnormalised probs [B, V] by inverting the CDF: one uniform per row
    (a cumsum and a binary search: cheaper per call than torch.multinomial on a CPU)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # right=True skips zero-probability entries (their CDF equals the previous one).
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # [B, 1]


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [B, V] -> codes [B] (long). Greedy (argmax) when sample is False.

    Same distribution as the released sampler: temperature, then top-k, then top-p (nucleus, the
    token that crosses top_p is kept), then a draw from the renormalised softmax."""
    if not sample:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-5)
    V = logits.shape[-1]
    if 0 < top_k < V or top_p < 1.0:
        # Work on the sorted candidates only: top_k of them (cheap) or, for top-p alone, all of them.
        vals, cand = logits.topk(top_k if 0 < top_k < V else V, dim=-1)  # sorted, descending
        probs = F.softmax(vals, dim=-1)
        if top_p < 1.0:
            probs = _keep_top_p(probs, top_p)
        return cand.gather(-1, _draw(probs, generator))[:, 0]
    return _draw(F.softmax(logits, dim=-1), generator)[:, 0]


# ----------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------
def guidance_scales(
    cfg_scale: float, n_positions: int, cfg_interval: int = -1, cfg_schedule: str = "constant"
) -> list[Optional[float]]:
    """Scale used at each image position; None means "cond logits alone" (after cfg_interval).

    constant: cfg_scale everywhere. linear: ramps from 1 at the first position to cfg_scale at the
    last. cfg_interval >= 0: guidance only up to position cfg_interval + 1 (the released sampler's
    convention, counted from the first decoded position after the prefill)."""
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}; choose from {CFG_SCHEDULES}")
    scales: list[Optional[float]] = []
    for t in range(n_positions):
        if cfg_interval > -1 and t - 1 > cfg_interval:
            scales.append(None)
        elif cfg_schedule == "linear":
            scales.append(1.0 + (cfg_scale - 1.0) * t / max(n_positions - 1, 1))
        else:
            scales.append(cfg_scale)
    return scales


def _guide(logits: torch.Tensor, scale: Optional[float], doubled: bool) -> torch.Tensor:
    # logits [2B, V] (cond rows first, then uncond) -> [B, V]
    if not doubled:
        return logits
    cond, uncond = logits.chunk(2)
    return cond if scale is None else uncond + (cond - uncond) * scale


# ----------------------------------------------------------------------------------------------
# Cached decoding
# ----------------------------------------------------------------------------------------------
def decode_head(model, h, scale: Optional[float], doubled: bool, sampler: Callable):
    """The K head steps of one position: h [B2, dim] -> codes [B, K]. Head caches are overwritten."""
    head = model.output
    x = h[:, None]  # [B2, 1, dim]
    codes = []
    for k in range(model.num_codebooks):
        logits = head.step(x, model.head_pos[k], model.head_mask[k : k + 1])  # [B2, V]
        idx = sampler(_guide(logits, scale, doubled))  # [B]
        codes.append(idx)
        if k + 1 < model.num_codebooks:
            x = head.codebooks[k](torch.cat([idx, idx]) if doubled else idx)[:, None]  # same code to both halves
    return torch.stack(codes, dim=1)


def prefill(model, x, scale: Optional[float], doubled: bool, sampler: Callable):
    """Condition embeddings x [B2, T, dim] (Transformer.embed_condition) at positions 0..T-1
    -> codes of image position 0 [B, K]."""
    T = model.cls_token_num
    h = model.step(x, model.seq_pos[:T], kv_len=T)
    return decode_head(model, h, scale, doubled, sampler)


def decode_one_token(model, codes, input_pos, scale: Optional[float], doubled: bool, sampler: Callable,
                     kv_len: Optional[int] = None):
    """Codes of the previous position [B, K], written at sequence slot input_pos [1] -> codes of the next [B, K].
    kv_len (eager only): number of filled cache slots, so attention skips the empty rest."""
    if doubled:
        codes = torch.cat([codes, codes])
    x = model.tok_embeddings(codes[:, :, None])  # [B2, 1, dim]
    h = model.step(x, input_pos, kv_len)
    return decode_head(model, h, scale, doubled, sampler)


def decode_n_tokens(model, codes, first_slot: int, scales, doubled: bool, sampler, step_fn=decode_one_token,
                    out=None, fixed_shapes: bool = False):
    """Positions 1..len(scales)-1 into out [B, K, L]; drops the uncond half for good once guidance is off.
    fixed_shapes (for torch.compile): attend over the whole masked cache instead of the filled prefix."""
    B = codes.shape[0]
    for t in range(1, len(scales)):
        if doubled and all(s is None for s in scales[t:]):
            _shrink_caches(model, B)  # the uncond rows can no longer matter
            doubled = False
        slot = first_slot + t - 1  # where the previous position's codes go
        kv_len = None if fixed_shapes else slot + 1
        codes = step_fn(model, codes, model.seq_pos[slot : slot + 1], scales[t], doubled, sampler, kv_len)
        out[:, :, t] = codes
    return out


def _shrink_caches(model, batch_size: int) -> None:
    if model.causal_mask.ndim == 4:  # per-row caption masks
        model.causal_mask = model.causal_mask[:batch_size]
    for layer in list(model.layers) + list(model.output.layers):
        cache = layer.attention.kv_cache
        cache.k_cache, cache.v_cache = cache.k_cache[:batch_size], cache.v_cache[:batch_size]


# ----------------------------------------------------------------------------------------------
# CPU: prepacked weights
# ----------------------------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """An nn.Linear whose weight is reordered once into oneDNN's blocked layout (CPU, float32).

    Decoding multiplies only 2B rows by every weight at every step. On such skinny products MKL's
    plain sgemm stays far below the machine's matmul peak; the prepacked oneDNN kernel is 1.5-3.9x
    faster per product on a 2-core AVX2 CPU (bench/bench_generate.py). Same float32 arithmetic,
    summed in another order (~3e-7 relative). Inference only: the packed copy has no autograd."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # opaque oneDNN tensor
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in_features] -> [..., out_features]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_prepack(model) -> bool:
    """Prepacking applies to float32 models on the CPU of a torch build with oneDNN."""
    w = model.norm.weight  # the model's dtype and device (read from a module that is never swapped)
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextmanager
def prepacked_linears(model, enabled: bool = True):
    """Within the block, every nn.Linear of the model is swapped for a PackedLinear (the originals
    come back afterwards, also on error). Costs one copy of the linear weights while active."""
    swapped = []
    if enabled:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear and getattr(child, "prepack", True):  # prepack=False: its weight is read directly
                    swapped.append((parent, name, child))
        for parent, name, child in swapped:
            setattr(parent, name, PackedLinear(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _check_args(model, cond: torch.Tensor, max_new_tokens: int, cond_mask: Optional[torch.Tensor] = None) -> None:
    if model.config.model_type == "c2i":
        if cond.ndim != 1:
            raise ValueError(f"cond must be a 1-D tensor of class labels, got shape {tuple(cond.shape)}")
        if cond_mask is not None:
            raise ValueError("cond_mask is for text-to-image models; this one is class-conditional")
    else:
        T = model.cls_token_num
        want = "word ids [B, T]" if model.text_encoder is not None else "caption features [B, T, caption_dim]"
        if cond.ndim != (2 if model.text_encoder is not None else 3) or cond.shape[1] != T:
            raise ValueError(f"cond must be {want} with T = cls_token_num = {T}, got shape {tuple(cond.shape)}")
        if cond_mask is not None and tuple(cond_mask.shape) != tuple(cond.shape[:2]):
            raise ValueError(f"cond_mask {tuple(cond_mask.shape)} must be [B, T] = {tuple(cond.shape[:2])}")
    if not 1 <= max_new_tokens <= model.block_size:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, block_size={model.block_size}]")


def _with_null_condition(model, cond: torch.Tensor, cfg_scale: float, cond_mask: Optional[torch.Tensor] = None):
    """(guided?, cond [B2, ...], cond_mask [B2, T] or None, drop [B2] bool or None) on the model's device:
    with guidance the batch is doubled and the second half is marked for the null class / caption."""
    doubled = cfg_scale > 1.0
    if doubled and model.config.class_dropout_prob <= 0:
        raise ValueError("guidance needs the null class: this model was built with class_dropout_prob = 0")
    device = model.norm.weight.device
    cond = cond.to(device)
    cond_mask = None if cond_mask is None else cond_mask.to(device).bool()
    if not doubled:
        return False, cond, cond_mask, None
    drop = torch.arange(2 * cond.shape[0], device=device) >= cond.shape[0]
    return True, torch.cat([cond, cond]), None if cond_mask is None else torch.cat([cond_mask, cond_mask]), drop


def generate(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sample_logits: bool = True,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
    prepack: Optional[bool] = None,
    cond_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Class labels cond [B] -> codes [B, K, max_new_tokens] (long), in raster order. Text-to-image
    models: cond = caption features [B, T, caption_dim] (word ids [B, T] with a built-in text encoder)
    and cond_mask [B, T] (True at real caption positions; None: all real).

    cfg_scale > 1 enables guidance (batch doubled with the null class). sample_logits=False is greedy.
    Pass a torch.Generator (on the model's device) for reproducible samples. compile=True wraps the
    per-position step in torch.compile (worth it on a GPU; the first call pays the compile time).
    prepack: reorder the linear weights once per call for oneDNN (`PackedLinear`); None = whenever
    `can_prepack(model)` and not compiling (float32 on the CPU)."""
    _check_args(model, cond, max_new_tokens, cond_mask)
    if prepack is None:
        prepack = can_prepack(model) and not compile
    elif prepack and not can_prepack(model):
        raise ValueError("prepack=True needs a float32 model on the CPU and a torch build with oneDNN")
    with torch.inference_mode(), prepacked_linears(model, prepack):
        codes = _generate(model, cond, max_new_tokens, cfg_scale, cfg_interval, cfg_schedule, temperature, top_k,
                          top_p, sample_logits, generator, compile, cond_mask)
    return codes.clone()  # a normal tensor (inference tensors cannot enter autograd later)


def _generate(model, cond, max_new_tokens, cfg_scale, cfg_interval, cfg_schedule, temperature, top_k, top_p,
              sample_logits, generator, compile, cond_mask=None) -> torch.Tensor:
    doubled, cond_combined, mask_combined, drop = _with_null_condition(model, cond, cfg_scale, cond_mask)
    B, K, T, device = cond.shape[0], model.num_codebooks, model.cls_token_num, cond_combined.device
    scales = guidance_scales(cfg_scale, max_new_tokens, cfg_interval, cfg_schedule)

    def sampler(logits):
        return _sample(logits, temperature, top_k, top_p, sample_logits, generator)

    was_training = model.training
    model.eval()
    seq_len = T + max_new_tokens - 1  # the last position's codes are never fed back
    model.setup_caches(cond_combined.shape[0], seq_len, cond_mask=mask_combined)
    step_fn = torch.compile(decode_one_token, dynamic=False) if compile else decode_one_token
    try:
        out = torch.empty(B, K, max_new_tokens, dtype=torch.long, device=device)
        x = model.embed_condition(cond_combined, mask_combined, drop)  # [B2, T, dim]
        out[:, :, 0] = codes = prefill(model, x, scales[0], doubled, sampler)
        decode_n_tokens(model, codes, T, scales, doubled, sampler, step_fn=step_fn, out=out, fixed_shapes=compile)
    finally:
        model.clear_caches()
        model.train(was_training)
    return out


_sample = sample_logits  # generate() has a flag of the same name


# ----------------------------------------------------------------------------------------------
# The cache-free reference
# ----------------------------------------------------------------------------------------------
def generate_naive(
    model,
    cond: torch.Tensor,
    max_new_tokens: int,
    cfg_scale: float = 1.0,
    cfg_interval: int = -1,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sample_logits: bool = True,
    generator: Optional[torch.Generator] = None,
    cond_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as `generate`, without caches: for every position the main stack reruns the whole
    prefix, and for every codebook the head reruns its whole short sequence. Slow by design."""
    _check_args(model, cond, max_new_tokens, cond_mask)
    with torch.inference_mode():
        codes = _generate_naive(model, cond, max_new_tokens, cfg_scale, cfg_interval, cfg_schedule, temperature,
                                top_k, top_p, sample_logits, generator, cond_mask)
    return codes.clone()


def _generate_naive(model, cond, max_new_tokens, cfg_scale, cfg_interval, cfg_schedule, temperature, top_k, top_p,
                    sample_logits, generator, cond_mask=None) -> torch.Tensor:
    doubled, cond_combined, mask_combined, drop = _with_null_condition(model, cond, cfg_scale, cond_mask)
    B, K, device = cond.shape[0], model.num_codebooks, cond_combined.device
    scales = guidance_scales(cfg_scale, max_new_tokens, cfg_interval, cfg_schedule)
    was_training = model.training
    model.eval()
    out = torch.zeros(cond_combined.shape[0], K, max_new_tokens, dtype=torch.long, device=device)
    try:
        for t in range(max_new_tokens):
            h = model.hidden(out[:, :, :t], cond_combined, mask_combined, drop)[:, -1:]  # [B2, 1, dim]
            for k in range(K):
                logits = model.output(h, out[:, :, t : t + 1])[:, 0, k]  # [B2, V]; codes >= k are not read
                idx = _sample(_guide(logits, scales[t], doubled), temperature, top_k, top_p, sample_logits, generator)
                out[:, k, t] = torch.cat([idx, idx]) if doubled else idx
    finally:
        model.train(was_training)
    return out[:B]
