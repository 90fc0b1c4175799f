"""A small text encoder trained jointly with the text-to-image GPT, for CPU and offline use.

No download: the vocabulary is the set of words of the training captions (`WordVocab.build`), and the
encoder (`WordTextEncoder`: word + position embeddings, optional bidirectional pre-norm blocks, LayerNorm)
is trained from scratch together with the GPT, which owns it as `Transformer.text_encoder` (so the
optimizer, EMA, DDP and checkpoints need nothing extra). Captions are left-padded to the GPT's
`cls_token_num` positions, as LlamaGen pads T5 features: the last condition position is always a word.

By default there are no blocks: the GPT attends to the caption positions by content (ModelArgs.cond_rotation)
and composes the words itself, while blocks trained from scratch on short captions that share most words
mixed them into near-identical features and the prompt was followed less (docs/QUICKSTART.md). Blocks
(`--text-layers N`) are there for longer free-text captions.

Pretrained encoders (T5, BERT-style) are used through `datasets/text_features.py` instead, which
stores their features once; the GPT then reads them through its caption projection.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words and numbers of a caption; punctuation separates them ("T1-weighted" is one word)."""
    return _WORD.findall(str(text).lower())


class WordVocab:
    """Word <-> id. Id 0 is padding, 1 stands for words not seen in training."""

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:2]) != [PAD, UNK]:
            raise ValueError(f"a word vocabulary starts with {PAD!r}, {UNK!r}; got {list(tokens[:2])}")
        self.tokens = list(tokens)
        self.index = {w: i for i, w in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("the word vocabulary holds duplicates")

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "WordVocab":
        """Every word seen at least min_count times, most frequent first (ties alphabetical)."""
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + kept)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (ids [B, length] long, mask [B, length] bool), left-padded; longer captions keep
        their first `length` words. An empty caption is refused (it would leave nothing to attend to)."""
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for b, text in enumerate(texts):
            seq = [self.index.get(w, 1) for w in words(text)][:length]
            if not seq:
                raise ValueError(f"caption {b} ({text!r}) has no words")
            ids[b, length - len(seq):] = torch.tensor(seq)
            mask[b, length - len(seq):] = True
        return ids, mask


class TextBlock(nn.Module):
    """Pre-LayerNorm bidirectional self-attention + GELU MLP over the caption positions."""

    def __init__(self, dim: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x [B, T, dim]; key_mask [B, 1, 1, T] (True = a word): padded keys are never attended to.
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B, H, T, D // H]
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class WordTextEncoder(nn.Module):
    """Word ids [B, T] + mask [B, T] -> caption features [B, T, dim] (zero at padded positions)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, n_layer: int = 0, n_head: int | None = None,
                 dropout: float = 0.1):
        super().__init__()
        n_head = n_head or max(1, dim // 64)
        if dim % n_head:
            raise ValueError(f"text encoder width {dim} is not divisible by {n_head} heads")
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TextBlock(dim, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = ids != 0
        mask = mask.bool()
        # Positions count from the first word, so a caption's features do not depend on its padding.
        pos = (mask.long().cumsum(1) - 1).clamp_(min=0)  # [B, T]
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        key_mask = mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x) * mask[..., None]
