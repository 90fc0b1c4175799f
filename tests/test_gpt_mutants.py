"""models/gpt.py building blocks against formulas written out here (the contracts that mutation testing,
scripts/mutation.sh, found unchecked by the parity tests): RMSNorm, SwiGLU, stochastic depth, the 2-D
rotary table and rotation, the caption attention mask by hand, label and caption dropout, config checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt import (
    CaptionEmbedder, FeedForward, KVCache, LabelEmbedder, ModelArgs, RMSNorm, apply_rotary_emb, condition_mask,
    drop_path, find_multiple, precompute_freqs_cis_2d,
)
from test_gpt import tiny_args  # noqa: F401 (by basename: torch-fidelity ships a top-level `tests`)


def test_rms_norm_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g) * 3e-3  # mean(x^2) ~ 1e-5: the default eps matters
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=0)
    wide = RMSNorm(8, eps=0.5)
    torch.testing.assert_close(wide(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 0.5), rtol=1e-5, atol=0)
    assert norm(x.double()).dtype == torch.float64  # computed in float32, returned in the input's dtype


def test_swiglu_formula():
    config = tiny_args()  # dim 64, multiple_of 32: hidden = find_multiple(int(2 * 4 * 64 / 3) = 170, 32) = 192
    ff = FeedForward(config)
    assert ff.w1.weight.shape == (192, 64) and ff.w3.weight.shape == (192, 64) and ff.w2.weight.shape == (64, 192)
    x = torch.randn(2, 5, 64)
    w1, w2, w3 = ff.w1.weight, ff.w2.weight, ff.w3.weight
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ff.eval()(x), expected)


def test_derived_config_values():
    c = tiny_args(n_kv_head=2)
    assert (c.head_dim, c.kv_heads, c.sub_vocab_size, c.grid_size) == (16, 2, 32, 4)
    assert tiny_args().kv_heads == 4  # None: one key/value head per query head
    assert c.ffn_hidden_dim == 192
    assert tiny_args(ffn_dim_multiplier=1.5).ffn_hidden_dim == 256  # int(1.5 * 170) = 255 -> 256
    assert ModelArgs(dim=768, n_head=12).ffn_hidden_dim == 2048  # GPT-B: find_multiple(2048, 256)
    assert find_multiple(64, 32) == 64 and find_multiple(65, 32) == 96


@pytest.mark.parametrize("kw, message", [
    (dict(model_type="i2i"), "model_type='i2i': choose 'c2i' (class label) or 't2i' (caption)"),
    (dict(text_vocab_size=5), "text_vocab_size=5 needs model_type='t2i'"),
    (dict(dim=66, n_head=4), "dim=66 is not divisible by n_head=4"),
    (dict(dim=40, n_head=4), "head_dim=10 must be a multiple of 4"),
    (dict(n_kv_head=3), "n_head=4 is not a multiple of n_kv_head=3"),
    (dict(vocab_size=130), "vocab_size=130 is not divisible by num_codebooks=4"),
    (dict(block_size=12), "block_size=12 is not a square grid"),
    (dict(cls_token_num=0), "cls_token_num=0 must be at least 1"),
    (dict(vq_embed_width=32, vq_embed_vocab_width=6, vq_embed_heads=1), "vq_embed_vocab_width=6 must split over num_codebooks=4"),
    (dict(vq_embed_width=32, vq_embed_vocab_width=8, vq_embed_heads=0), "vq_embed_heads=0 must be >= 1"),
])
def test_config_errors_name_the_fields(kw, message):
    with pytest.raises(ValueError) as err:
        tiny_args(**kw)
    assert message in str(err.value)


def test_config_accepts_the_edge_values():
    tiny_args(cls_token_num=1, n_kv_head=1, vq_embed_width=32, vq_embed_vocab_width=8, vq_embed_heads=1)
    tiny_args(model_type="t2i", text_vocab_size=5)


def test_drop_path_keeps_or_drops_whole_samples_and_rescales():
    x = torch.ones(400, 3, 2)
    assert drop_path(x, 0.0, True) is x and drop_path(x, 0.5, False) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.25, True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # dropped, or kept and scaled
    kept = (per_sample[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.08  # keep probability 1 - p


def test_rotary_table_formula():
    g, hd, base, T = 3, 8, 100.0, 2
    table = precompute_freqs_cis_2d(g, hd, base, T)
    assert table.shape == (T + g * g, hd // 2, 2) and table.dtype == torch.float32
    assert torch.equal(table[:T], torch.zeros(T, hd // 2, 2))  # condition positions: no rotation, zeroed
    q = hd // 4  # pairs 0..q-1 turn with the row, q..2q-1 with the column, frequency base^(-2j / (hd / 2))
    for r in range(g):
        for c in range(g):
            for j in range(q):
                f = base ** (-2 * j / (hd // 2))
                for pair, pos in ((j, r), (q + j, c)):
                    cos, sin = table[T + r * g + c, pair].tolist()
                    assert cos == pytest.approx(math.cos(pos * f), abs=1e-6) and sin == pytest.approx(math.sin(pos * f), abs=1e-6)


def test_rotary_rotation_formula():
    x = torch.randn(2, 3, 1, 4)
    angles = torch.rand(3, 2) * 6
    table = torch.stack([angles.cos(), angles.sin()], -1)  # [S, head_dim // 2, 2]
    out = apply_rotary_emb(x, table)
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    torch.testing.assert_close(out[..., 0::2], a * cos - b * sin)
    torch.testing.assert_close(out[..., 1::2], a * sin + b * cos)
    assert apply_rotary_emb(x.double(), table).dtype == torch.float64


def test_condition_mask_by_hand():
    m = condition_mask(torch.tensor([[False, True], [True, True]]), 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0],  # a padded caption row sees only itself
                                      [0, 1, 0, 0],
                                      [0, 1, 1, 0],
                                      [0, 1, 1, 1]]
    assert torch.equal(m[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())  # no padding: plain causal
    as_ints = condition_mask(torch.tensor([[0, 1], [1, 1]]), 4)  # a 0/1 integer padding mask
    assert as_ints.dtype == torch.bool and torch.equal(as_ints, m)


def test_kv_cache_writes_the_given_slots():
    cache = KVCache(1, 5, 1, 2, torch.float32, "cpu")
    k, v = torch.ones(1, 1, 2, 2), 2 * torch.ones(1, 1, 2, 2)
    kc, vc = cache.update(torch.tensor([1, 3]), k, v)
    assert kc[0, 0, :, 0].tolist() == [0, 1, 0, 1, 0] and vc[0, 0, :, 0].tolist() == [0, 2, 0, 2, 0]
    assert not [n for n, _ in cache.named_buffers() if n in cache.state_dict()]  # never in checkpoints
    half = KVCache(1, 5, 1, 2, torch.bfloat16, "cpu")  # the model's dtype, so bf16 keys can be written
    assert half.k_cache.dtype == half.v_cache.dtype == torch.bfloat16


def test_label_dropout_uses_the_null_row():
    emb = LabelEmbedder(3, 4, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == 4  # + the null class
    assert LabelEmbedder(3, 4, dropout_prob=0.0).embedding_table.num_embeddings == 3
    labels = torch.tensor([0, 1, 2])
    null = emb.embedding_table.weight[3]
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[labels][:, None])
    emb.dropout_prob = 1.0
    assert torch.equal(emb(labels, train=True)[:, 0], null.expand(3, -1))  # every label dropped
    assert torch.equal(emb(labels, train=False)[:, 0], emb.embedding_table.weight[labels])  # never in eval
    emb.dropout_prob = 0.3
    torch.manual_seed(0)
    dropped = (emb(torch.zeros(2000, dtype=torch.long), train=True)[:, 0] == null).all(-1).float().mean().item()
    assert abs(dropped - 0.3) < 0.04


def test_caption_dropout_and_forced_null_caption():
    emb = CaptionEmbedder(6, 8, uncond_prob=0.3, token_num=2)
    assert emb.uncond_embedding.shape == (2, 6)
    caps = torch.randn(4, 2, 6)
    null = emb.cap_proj(emb.uncond_embedding)
    real = emb.cap_proj(caps)
    torch.testing.assert_close(emb(caps, train=False), real)  # no dropping in eval
    out = emb(caps, train=False, drop=torch.tensor([False, True, False, True]))
    torch.testing.assert_close(out[1::2], null.expand(2, -1, -1))
    torch.testing.assert_close(out[0::2], real[0::2])
    emb.uncond_prob = 1.0
    torch.testing.assert_close(emb(caps, train=True), null.expand(4, -1, -1))
    emb.uncond_prob = 1e-9  # training, (almost) never dropped at random: the forced rows are still dropped
    out = emb(caps, train=True, drop=torch.tensor([True, False, True, False]))
    torch.testing.assert_close(out[0::2], null.expand(2, -1, -1))
    torch.testing.assert_close(out[1::2], real[1::2])
    emb.uncond_prob = 0.3
    torch.manual_seed(0)
    many = emb(caps[:1].expand(2000, -1, -1), train=True, drop=torch.zeros(2000, dtype=torch.bool))
    dropped = (many - null).abs().amax((1, 2)).lt(1e-6).float().mean().item()
    assert abs(dropped - 0.3) < 0.04
    with pytest.raises(ValueError, match=r"caption features \(4, 3, 6\), the model expects \[B, 2, 6\]"):
        emb(torch.randn(4, 3, 6), train=False)


def test_caption_features_of_another_dtype_are_cast():
    emb = CaptionEmbedder(6, 8, uncond_prob=0.0, token_num=2)
    caps = torch.randn(3, 2, 6, dtype=torch.float64)  # e.g. features saved in float64 by numpy
    torch.testing.assert_close(emb(caps, train=False), emb.cap_proj(caps.float()))


def test_targets_of_the_wrong_length_are_named():
    from models.gpt import Transformer
    model = Transformer(tiny_args())  # block_size 16
    codes = torch.zeros(2, 4, 16, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        model(codes[:, :, :-1], torch.tensor([0, 1]), targets=codes[:, :, :-2])
    assert "targets cover 14 positions, expected idx positions + 1 = 16" in str(err.value)


def test_caption_projection_is_bias_free_and_null_caption_init_scale():
    # LlamaGen's keys: cap_proj.fc1.weight / fc2.weight only (a bias would break strict loading of its checkpoints).
    emb = CaptionEmbedder(64, 8, uncond_prob=0.1, token_num=120)
    assert sorted(emb.cap_proj.state_dict()) == ["fc1.weight", "fc2.weight"]
    # The null caption starts as randn / sqrt(caption_dim) (LlamaGen's initial value): std 1/8 here.
    assert abs(emb.uncond_embedding.std().item() - 1 / 8) < 0.01


def test_too_many_input_positions_are_refused():
    from models.gpt import Transformer
    model = Transformer(tiny_args())  # block_size 16: at most 15 input positions (the 16th is only predicted)
    codes = torch.zeros(1, 4, 16, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        model(codes, torch.tensor([0]))
    assert "16 input positions exceed block_size - 1 = 15" in str(err.value)
    assert model(codes[:, :, :15], torch.tensor([0]))[0].shape == (1, 4, 16, 32)


def test_caches_take_the_model_dtype_or_the_given_one():
    from models.gpt import Transformer
    model = Transformer(tiny_args(n_output_layer=1)).to(torch.bfloat16)
    for dtype, expected in ((None, torch.bfloat16), (torch.float64, torch.float64)):
        model.setup_caches(2, 8, dtype=dtype)
        for cache in (model.layers[0].attention.kv_cache, model.output.layers[0].attention.kv_cache):
            assert cache.k_cache.dtype == cache.v_cache.dtype == expected
        assert model.layers[0].attention.kv_cache.k_cache.shape == (2, 4, 8, 16)  # [B, H_kv, S_max, head_dim]
        assert model.output.layers[0].attention.kv_cache.k_cache.shape == (2, 4, 4, 16)  # [B, H_kv, K, head_dim]
        model.clear_caches()


@pytest.mark.parametrize("kw", [dict(attn_dropout_p=0.5), dict(drop_path_rate=0.5), dict(class_dropout_prob=0.5)])
def test_each_dropout_alone_is_active_in_train_mode_only(kw):
    from models.gpt import Transformer
    from test_gpt import random_batch, randomize
    model = randomize(Transformer(tiny_args(**{"class_dropout_prob": 0.0, **kw})))  # tiny_args: no other dropout
    codes, labels = random_batch(model.config)
    torch.manual_seed(0)
    a, b = (model.train()(codes[:, :, :-1], labels, targets=codes)[1] for _ in range(2))
    c, d = (model.eval()(codes[:, :, :-1], labels, targets=codes)[1] for _ in range(2))
    assert a != b and c == d


def test_condition_errors_are_named():
    from models.gpt import TokenEmbedder, Transformer
    with pytest.raises(ValueError, match="codes have 3 codebooks, the model expects 4"):
        TokenEmbedder(128, 8, 4)(torch.zeros(2, 3, 5, dtype=torch.long))
    builtin = Transformer(tiny_args(model_type="t2i", cls_token_num=5, caption_dim=24, text_vocab_size=20, text_layers=1))
    with pytest.raises(ValueError) as err:
        builtin.embed_condition(torch.randn(2, 5, 24))
    assert "this t2i model has its own text encoder: cond must be word ids [B, T], not features" in str(err.value)


@pytest.mark.parametrize("silenced", ["attention", "feed_forward"])
def test_drop_path_on_each_residual_branch(silenced):
    """With one branch silenced (its output layer zeroed), a block in train mode returns, per sample, either x
    (branch dropped) or x + branch / (1 - p) (kept, rescaled): stochastic depth acts on each branch."""
    from models.gpt import TransformerBlock
    torch.manual_seed(0)
    block = TransformerBlock(tiny_args(), drop_path_p=0.5)
    with torch.no_grad():
        (block.attention.wo if silenced == "attention" else block.feed_forward.w2).weight.zero_()
    x = torch.randn(64, 3, 64)
    with torch.no_grad():
        branch = block.eval()(x) - x
        y = block.train()(x)
    dropped = (y - x).abs().amax((1, 2)) == 0
    kept = (y - (x + 2 * branch)).abs().amax((1, 2)) < 1e-5
    assert (dropped | kept).all() and dropped.any() and kept.any()
