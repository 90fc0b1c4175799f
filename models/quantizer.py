"""Multi-codebook cosine vector quantizer (MedITok / UniTok style).

A feature of width `vocab_width` is split into `num_codebooks` equal chunks; each chunk is L2-normalised
and matched, by cosine similarity, against its own codebook of `vocab_size // num_codebooks` normalised
vectors. Decoding returns the normalised codebook vectors, concatenated back to `vocab_width`.
Parameter names (`codebooks.{k}.codebook.weight`, `codebooks.{k}.vocab_usage`) follow the released weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def entropy_loss(features: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample entropy minus codebook entropy of softmax(-||f - e||^2 / T): confident yet diverse picks.

    features [N, D], codebook [V, D] (both normalised) -> scalar.
    """
    dist = features.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * features @ codebook.T  # [N, V]
    logits = -dist.float() / temperature
    prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
    per_sample = (-prob * log_prob).sum(-1).mean()
    avg_prob = prob.mean(0)  # [V]
    codebook_entropy = (-avg_prob * torch.log(avg_prob + 1e-7)).sum()
    return per_sample - codebook_entropy


class Codebook(nn.Module):
    """One codebook: `size` vectors of width `width`, used L2-normalised."""

    def __init__(self, size: int, width: int):
        super().__init__()
        self.size, self.width = size, width
        self.codebook = nn.Embedding(size, width)
        # Running estimate of how often each code is picked (kept in the released state dict).
        self.register_buffer("vocab_usage", torch.zeros(size))
        self.usage_updates = 0  # not saved: the first updates use a faster running average

    def normalized_weight(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=1).float()  # [size, width]

    def f_to_idx(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., width] -> indices [...] of the most similar code (cosine)."""
        flat = F.normalize(f.reshape(-1, self.width), dim=-1).float()  # [N, width]
        idx = torch.argmax(flat.detach() @ self.normalized_weight().T, dim=1)  # [N]
        return idx.view(f.shape[:-1])

    def idx_to_f(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [...] -> normalised code vectors [..., width]."""
        return F.embedding(idx, self.normalized_weight())

    @torch.no_grad()
    def record_usage(self, idx: torch.Tensor) -> torch.Tensor:
        """Fold a batch's code frequencies into `vocab_usage` (training only); return its used fraction."""
        flat = idx.flatten()
        # scatter_add rather than bincount: it also runs on the meta device (shape checks of big models).
        ones = torch.ones_like(flat, dtype=torch.float)
        counts = torch.zeros(self.size, device=idx.device).scatter_add_(0, flat, ones)  # [size]
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank records the same global frequencies
        prob = counts / counts.sum().clamp_min(1)  # [size]
        if self.training:
            momentum = 0.0 if self.usage_updates == 0 else (0.9 if self.usage_updates < 100 else 0.99)
            self.vocab_usage.mul_(momentum).add_(prob, alpha=1 - momentum)
            self.usage_updates += 1
        # A code counts as used when it takes more than 1 % of its uniform share.
        return (prob > 0.01 / self.size).float().mean()


class MultiCodebookQuantizer(nn.Module):
    """`num_codebooks` cosine codebooks over equal chunks of a `vocab_width` feature.

    f_to_idx: [B, L, vocab_width] -> [B, K, L]; idx_to_f: [B, K, L] or [B, K, h, w] -> [B, L, vocab_width].
    forward (training): straight-through quantisation with the VQ loss
    `beta * mse(sg(q), f) + mse(q, sg(f))` and the optional entropy loss, both averaged over codebooks.
    """

    def __init__(self, vocab_size: int, vocab_width: int, num_codebooks: int, beta: float = 0.25,
                 use_entropy_loss: bool = False, entropy_temp: float = 0.01):
        super().__init__()
        if vocab_size % num_codebooks or vocab_width % num_codebooks:
            raise ValueError(
                f"vocab_size={vocab_size} and vocab_width={vocab_width} must both be divisible by "
                f"num_codebooks={num_codebooks}"
            )
        self.vocab_size, self.vocab_width, self.num_codebooks = vocab_size, vocab_width, num_codebooks
        self.codebook_size = vocab_size // num_codebooks
        self.chunk = vocab_width // num_codebooks
        self.beta, self.use_entropy_loss, self.entropy_temp = beta, use_entropy_loss, entropy_temp
        self.codebooks = nn.ModuleList(Codebook(self.codebook_size, self.chunk) for _ in range(num_codebooks))

    def f_to_idx(self, f: torch.Tensor) -> torch.Tensor:
        chunks = f.split(self.chunk, dim=-1)  # K x [B, L, chunk]
        return torch.stack([cb.f_to_idx(c) for cb, c in zip(self.codebooks, chunks)], dim=1)  # [B, K, L]

    def idx_to_f(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() not in (3, 4) or idx.shape[1] != self.num_codebooks:
            raise ValueError(
                f"indices must be [B, {self.num_codebooks}, L] or [B, {self.num_codebooks}, h, w]; "
                f"got {tuple(idx.shape)}"
            )
        idx = idx.flatten(2).long()  # [B, K, L]
        return torch.cat([cb.idx_to_f(idx[:, k]) for k, cb in enumerate(self.codebooks)], dim=-1)  # [B, L, width]

    def forward(self, f: torch.Tensor):
        """f [B, L, vocab_width] -> (quantized [B, L, vocab_width], vq_loss, entropy_loss, usage [K], idx [B, K, L])."""
        outs, idxs, usages = [], [], []
        vq_loss = f.new_zeros(())
        ent_loss = f.new_zeros(())
        for cb, chunk in zip(self.codebooks, f.split(self.chunk, dim=-1)):
            fn = F.normalize(chunk, dim=-1).float()  # [B, L, chunk]
            idx = cb.f_to_idx(fn)  # [B, L]
            q = cb.idx_to_f(idx)  # [B, L, chunk]
            vq_loss = vq_loss + self.beta * F.mse_loss(q.detach(), fn) + F.mse_loss(q, fn.detach())
            if self.use_entropy_loss:
                ent_loss = ent_loss + entropy_loss(fn.reshape(-1, self.chunk), cb.normalized_weight(),
                                                   self.entropy_temp)
            if self.training:
                q = fn + (q - fn).detach()  # straight-through: gradients flow to the encoder
            # In evaluation q stays the code vectors themselves, so this equals idx_to_f(f_to_idx(f)).
            usages.append(cb.record_usage(idx))
            outs.append(q)
            idxs.append(idx)
        K = self.num_codebooks
        return torch.cat(outs, -1), vq_loss / K, ent_loss / K, torch.stack(usages), torch.stack(idxs, 1)
