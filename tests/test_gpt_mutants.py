"""models/gpt.py building blocks against formulas written out here (the contracts that mutation testing,
scripts/mutation.sh, found unchecked by the parity tests): RMSNorm, SwiGLU, stochastic depth, the 2-D
rotary table and rotation, the caption attention mask by hand, label and caption dropout, config checks."""
from __future__ import annotations

import math
from dataclasses import asdict

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
    assert str(err.value) == "this t2i model has its own text encoder: cond must be word ids [B, T], not features"
    features_only = Transformer(tiny_args(model_type="t2i", cls_token_num=5, caption_dim=24))
    with pytest.raises(ValueError) as err:
        features_only.embed_condition(torch.zeros(2, 5, dtype=torch.long))
    assert str(err.value) == "this t2i model reads caption features [B, T, caption_dim]; got integer ids"


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


# ----------------------------------------------------------------------------------------------
# Construction: initial weights, per-module settings from the config, parameter shapes by formula
# ----------------------------------------------------------------------------------------------
def _t2i_builtin(**kw):
    return tiny_args(**{"model_type": "t2i", "cls_token_num": 5, "caption_dim": 24, "text_vocab_size": 20, "text_layers": 1, **kw})


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_initial_weights_follow_the_documented_init(kind):
    """LlamaGen's init: every Linear and Embedding weight ~ N(0, initializer_range), every Linear bias 0, and
    the code head's weight 0 (uniform first predictions). PyTorch's own defaults differ: kaiming-uniform
    Linear weights (std 1/sqrt(3 fan_in), 0.072 at width 64), N(0, 1) embeddings, non-zero biases."""
    from models.gpt import RMSNorm as Norm, Transformer
    std = 0.05
    torch.manual_seed(0)
    model = Transformer(tiny_args(initializer_range=std) if kind == "c2i" else _t2i_builtin(initializer_range=std))
    head = model.output.linear_head
    assert torch.equal(head.weight, torch.zeros_like(head.weight)) and torch.equal(head.bias, torch.zeros_like(head.bias))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m is not head:
            w, n = m.weight.detach().double(), m.weight.numel()
            assert abs(w.mean().item()) < 4 * std / math.sqrt(n), name  # 4 standard errors
            assert abs(w.std().item() / std - 1) < 4 / math.sqrt(2 * n), name
            checked += 1
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        if isinstance(m, Norm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
    # c2i: 4 token tables, 3 head tables, the label table, 4 linears in each of 3 blocks + 1 + 2 (wqkv, wo, w1..w3)
    assert checked == (4 + 3 + 1 + 5 * 3 if kind == "c2i" else 4 + 3 + 5 * 3 + 2 + 2 + 4)
    if kind == "t2i":  # the null caption keeps its own scale (randn / sqrt(caption_dim))
        assert abs(model.cls_embedding.uncond_embedding.std().item() - 24 ** -0.5) < 0.05


def test_norm_eps_and_drop_path_rates_come_from_the_config():
    from models.gpt import RMSNorm as Norm, Transformer
    model = Transformer(tiny_args(norm_eps=1e-2, n_layer=5, n_output_layer=2, drop_path_rate=0.4))
    norms = [m for m in model.modules() if isinstance(m, Norm)]
    assert len(norms) == 2 * (5 + 2) + 2 and all(m.eps == 1e-2 for m in norms)  # 2 per block, final, head's
    # Stochastic depth grows linearly over the main stack, from 0 to drop_path_rate; the head's blocks have none.
    assert [layer.drop_path_p for layer in model.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [layer.drop_path_p for layer in model.output.layers] == [0.0, 0.0]


def test_parameter_shapes_by_formula():
    """Every key and shape written out from the config (grouped-query attention, two head layers, t2i with
    a text encoder of 2 blocks): the fused qkv holds n_head + 2 n_kv_head heads; SwiGLU hidden =
    find_multiple(int(8 dim / 3), multiple_of); K token tables, K - 1 head tables of vocab_size / K rows."""
    from models.gpt import Transformer
    c = _t2i_builtin(n_kv_head=2, n_output_layer=2, multiple_of=48, text_layers=2)
    dim, hd, K, V, hidden = 64, 16, 4, 32, 192  # find_multiple(170, 48) = 192
    want = {f"tok_embeddings.codebooks.{k}.weight": (V, dim) for k in range(K)}
    want.update({f"output.codebooks.{k}.weight": (V, dim) for k in range(K - 1)})
    for prefix in [f"layers.{i}." for i in range(2)] + [f"output.layers.{j}." for j in range(2)]:
        want.update({prefix + "attention.wqkv.weight": ((4 + 2 * 2) * hd, dim), prefix + "attention.wo.weight": (dim, dim),
                     prefix + "feed_forward.w1.weight": (hidden, dim), prefix + "feed_forward.w3.weight": (hidden, dim),
                     prefix + "feed_forward.w2.weight": (dim, hidden), prefix + "attention_norm.weight": (dim,),
                     prefix + "ffn_norm.weight": (dim,)})
    want.update({"norm.weight": (dim,), "output.norm.weight": (dim,), "output.linear_head.weight": (V, dim),
                 "output.linear_head.bias": (V,), "cls_embedding.cap_proj.fc1.weight": (dim, 24),
                 "cls_embedding.cap_proj.fc2.weight": (dim, dim), "cls_embedding.uncond_embedding": (5, 24),
                 "text_encoder.word_embeddings.weight": (20, 24), "text_encoder.position_embeddings.weight": (5, 24),
                 "text_encoder.norm.weight": (24,), "text_encoder.norm.bias": (24,)})
    for b in range(2):
        p = f"text_encoder.blocks.{b}."
        want.update({p + "norm1.weight": (24,), p + "norm1.bias": (24,), p + "norm2.weight": (24,), p + "norm2.bias": (24,),
                     p + "qkv.weight": (72, 24), p + "qkv.bias": (72,), p + "proj.weight": (24, 24), p + "proj.bias": (24,),
                     p + "fc1.weight": (96, 24), p + "fc1.bias": (96,), p + "fc2.weight": (24, 96), p + "fc2.bias": (24,)})
    got = {k: tuple(v.shape) for k, v in Transformer(c).state_dict().items()}
    assert got == want


def test_text_encoder_dropout_is_the_configs():
    """With every dropout of the config at 0 a t2i model with its own text encoder computes the same loss in
    train and eval mode (the text encoder's own default dropout is 0.1); a config value reaches its blocks."""
    from models.gpt import Transformer
    from test_gpt import randomize
    model = randomize(Transformer(_t2i_builtin(class_dropout_prob=0.0)))
    assert model.text_encoder.blocks[0].dropout.p == 0.0
    ids = torch.randint(1, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, 32, (3, 4, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    train = model.train()(codes[:, :, :-1], ids, targets=codes)[1]
    assert train == model.eval()(codes[:, :, :-1], ids, targets=codes)[1]
    assert Transformer(_t2i_builtin(resid_dropout_p=0.3)).text_encoder.blocks[0].dropout.p == 0.3
    assert Transformer(tiny_args()).config.model_type == "c2i" and not hasattr(Transformer(tiny_args()), "text_encoder")


# ----------------------------------------------------------------------------------------------
# Loading: the config from shapes, the tokenizer part of a VQ-embedding GPT, strict loading
# ----------------------------------------------------------------------------------------------
def _official_gpt_b_meta_state_dict():
    """The released GPT-B's keys and shapes (tests/data/gpt_b_c2i_official.keys.tsv), as meta tensors."""
    from pathlib import Path
    rows = (Path(__file__).parent / "data" / "gpt_b_c2i_official.keys.tsv").read_text().splitlines()
    sd = {}
    for name, shape, _ in (line.split("\t") for line in rows if line):
        sd[name] = torch.empty(tuple(int(d) for d in shape.split("x")), device="meta")
    return sd


def test_infer_config_of_the_released_gpt_b_key_list():
    from models.gpt import Transformer, infer_config
    sd = _official_gpt_b_meta_state_dict()
    cfg = infer_config(sd)
    # The released GPT-B: 12 layers of width 768 (12 heads, from the registry), 1 head layer, 8 codebooks of
    # 4096 codes, 6 classes + the null row, SwiGLU 2048 = find_multiple(2048, 256) (so multiple_of keeps its default).
    assert cfg == dict(dim=768, n_layer=12, n_output_layer=1, num_codebooks=8, vocab_size=32768, class_dropout_prob=0.1,
                       cls_token_num=1, block_size=256, cond_rotation="zero", num_classes=6, n_head=12, n_kv_head=None)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**cfg))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert infer_config(sd, block_size=64, cls_token_num=3)["block_size"] == 64  # overrides win


def _shapes_only(config: ModelArgs) -> dict:
    from models.gpt import Transformer
    with torch.device("meta"):
        return Transformer(config).state_dict()


def test_infer_config_grouped_query_attention_and_swiglu_width():
    from models.gpt import infer_config
    # dim 128 (GPT-Tiny's width), 8 heads of 16 with 2 key/value heads; SwiGLU int(8 * 128 / 3) = 341 -> 384
    # with multiple_of 96 (find_multiple(341, 256) would be 512): multiple_of = the width itself reproduces it.
    config = ModelArgs(dim=128, n_layer=3, n_head=8, n_kv_head=2, n_output_layer=2, multiple_of=96, vocab_size=96,
                       num_codebooks=3, num_classes=4, block_size=16)
    sd = _shapes_only(config)
    cfg = infer_config(sd, n_head=8)
    assert cfg == dict(dim=128, n_layer=3, n_output_layer=2, num_codebooks=3, vocab_size=96, class_dropout_prob=0.1,
                       cls_token_num=1, block_size=256, cond_rotation="zero", num_classes=4, n_head=8, n_kv_head=2,
                       multiple_of=384)
    assert all(type(v) is int for k, v in cfg.items() if k not in ("class_dropout_prob", "cond_rotation"))
    rebuilt = _shapes_only(ModelArgs(**{**cfg, "block_size": 16}))  # and it builds that model
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}
    assert infer_config(sd, n_head=8, n_kv_head=4)["n_kv_head"] == 4  # given, not inferred
    given = infer_config(sd, n_head=8, multiple_of=96)
    assert given["multiple_of"] == 96
    assert "multiple_of" not in infer_config(sd, n_head=8, ffn_dim_multiplier=1.0)
    # A width of exactly int(8 dim / 3) that is no multiple of 256 (multiple_of 1): multiple_of = that width.
    exact = _shapes_only(ModelArgs(dim=128, n_layer=1, n_head=4, multiple_of=1, vocab_size=64, num_codebooks=2, block_size=16))
    assert infer_config(exact)["multiple_of"] == 341
    # Without n_head the registry's GPT-Tiny (4 heads of 32) is assumed: 12 rows of 16 = 6 of 32 -> 1 kv head.
    assert infer_config(sd)["n_kv_head"] == 1
    # As many kv heads as heads: plain multi-head attention (None).
    assert infer_config(_shapes_only(ModelArgs(dim=128, n_layer=1, n_head=4, n_kv_head=4, vocab_size=64, num_codebooks=2,
                                               block_size=16)))["n_kv_head"] is None


def test_infer_config_refusals_name_what_is_missing():
    from models.checkpoint import CheckpointError
    from models.gpt import infer_config
    sd = _shapes_only(ModelArgs(dim=128, n_layer=1, n_head=4, vocab_size=64, num_codebooks=2, block_size=16))
    for key in ("layers.0.attention.wqkv.weight", "tok_embeddings.codebooks.0.weight", "cls_embedding.embedding_table.weight"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(CheckpointError) as err:
            infer_config(broken)
        assert str(err.value) == f"cannot infer a GPT config: state dict lacks {[key]}"
    odd = _shapes_only(ModelArgs(dim=96, n_layer=1, n_head=4, vocab_size=64, num_codebooks=2, block_size=16, multiple_of=32))
    with pytest.raises(CheckpointError) as err:
        infer_config(odd)
    assert str(err.value) == ("cannot infer n_head for dim=96 (registry dims: [128, 384, 768, 1024, 1280, 1536, 2560]); "
                              "pass n_head=...")
    assert infer_config(odd, n_head=4)["dim"] == 96
    # A SwiGLU narrower than int(8 dim / 3) cannot come from multiple_of alone: 0.5 * 341 -> 170 -> 192 < 341.
    narrow = _shapes_only(ModelArgs(dim=128, n_layer=1, n_head=4, vocab_size=64, num_codebooks=2, block_size=16,
                                    multiple_of=32, ffn_dim_multiplier=0.5))
    with pytest.raises(CheckpointError) as err:
        infer_config(narrow)
    assert str(err.value) == "SwiGLU width 192 < 341: pass ffn_dim_multiplier/multiple_of"
    assert infer_config(narrow, ffn_dim_multiplier=0.5, multiple_of=32)["dim"] == 128


def test_infer_config_of_t2i_and_vq_embedding_layouts():
    from models.gpt import infer_config
    t2i = ModelArgs(dim=128, n_layer=2, n_head=4, vocab_size=64, num_codebooks=2, block_size=16, model_type="t2i",
                    cls_token_num=6, caption_dim=40, multiple_of=256)
    assert infer_config(_shapes_only(t2i)) == dict(
        dim=128, n_layer=2, n_output_layer=1, num_codebooks=2, vocab_size=64, class_dropout_prob=0.1, cls_token_num=6,
        block_size=256, cond_rotation="zero", caption_dim=40, model_type="t2i", n_head=4, n_kv_head=None)
    for layers in (3, 0):  # 0: word and position embeddings only (no text_encoder.blocks.* keys)
        builtin = ModelArgs(**{**asdict(t2i), "text_vocab_size": 30, "text_layers": layers})
        cfg = infer_config(_shapes_only(builtin))
        assert (cfg["text_vocab_size"], cfg["text_layers"], cfg["caption_dim"], cfg["cls_token_num"]) == (30, layers, 40, 6)
    with pytest.raises(Exception) as err:  # a caption projection without its null caption
        infer_config({k: v for k, v in _shapes_only(t2i).items() if k != "cls_embedding.uncond_embedding"})
    assert "lacks ['cls_embedding.uncond_embedding']" in str(err.value)
    # Token embeddings from a tokenizer: 3 codebooks of 16 codes, latent width 12 -> post_quant_proj width 48, 2 heads.
    vq = ModelArgs(dim=128, n_layer=1, n_head=4, vocab_size=48, num_codebooks=3, block_size=16, num_classes=5,
                   vq_embed_width=48, vq_embed_vocab_width=12, vq_embed_heads=2)
    cfg = infer_config(_shapes_only(vq))
    assert cfg == dict(dim=128, n_layer=1, n_output_layer=1, num_codebooks=3, vocab_size=48, class_dropout_prob=0.1,
                       cls_token_num=1, block_size=256, cond_rotation="zero", num_classes=5, vq_embed_width=48,
                       vq_embed_vocab_width=12, vq_embed_heads=4, n_head=4, n_kv_head=None)  # heads: 48 // 12 (no trace)
    with pytest.raises(Exception) as err:
        infer_config({k: v for k, v in _shapes_only(vq).items() if k != "tok_embeddings.post_quant_proj.proj.weight"})
    assert "lacks ['tok_embeddings.post_quant_proj.proj.weight']" in str(err.value)


def test_vq_embed_dims_rules():
    from models.gpt import vq_embed_dims
    sd = {"tok.post_quant_proj.proj.weight": torch.empty(48, 12)}
    assert vq_embed_dims(sd, "tok.") == dict(vq_embed_width=48, vq_embed_vocab_width=12, vq_embed_heads=4)
    assert vq_embed_dims(sd, "tok.", {"proj_heads": 3})["vq_embed_heads"] == 3  # the tokenizer's config says so
    assert vq_embed_dims(sd, "tok.", {"proj_heads": 0})["vq_embed_heads"] == 4  # 0: the MedITok rule
    narrow = {"post_quant_proj.proj.weight": torch.empty(8, 12)}  # wider latent than output: at least one head
    assert vq_embed_dims(narrow)["vq_embed_heads"] == 1
    assert all(type(v) is int for v in vq_embed_dims(sd, "tok.").values())


def _tokenizer_part(width=48, vocab_width=12, K=3, codes=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {f"quantizer.codebooks.{k}.codebook.weight": torch.randn(codes, vocab_width // K, generator=g) for k in range(K)}
    sd["post_quant_proj.proj.weight"] = torch.randn(width, vocab_width, generator=g)
    for i in range(4):  # the rest of a tokenizer, left out (enough keys that the error shows only the first 5)
        sd[f"encoder.blocks.{i}.weight"] = torch.randn(4, generator=g)
    return sd


def test_load_vq_embedding_layouts_and_refusal(tmp_path):
    from models.checkpoint import CheckpointError
    from models.gpt import load_vq_embedding
    sd = _tokenizer_part()
    ema = {k: v + 1 for k, v in sd.items()}
    part_keys = sorted(k for k in sd if not k.startswith("encoder."))
    torch.save({"model": sd, "ema": ema, "config": {"proj_heads": 6}}, tmp_path / "ours.pt")
    part, dims = load_vq_embedding(tmp_path / "ours.pt")
    assert sorted(part) == part_keys and all(torch.equal(part[k], ema[k]) for k in part)  # EMA weights preferred
    assert dims == dict(vq_embed_width=48, vq_embed_vocab_width=12, vq_embed_heads=6)  # heads from its config
    torch.save({"trainer": {"unitok": sd}, "config": {"proj_heads": 6}}, tmp_path / "trainer.pth")
    part, dims = load_vq_embedding(tmp_path / "trainer.pth")
    assert sorted(part) == part_keys and all(torch.equal(part[k], sd[k]) for k in part)
    assert dims["vq_embed_heads"] == 4  # the released trainer format has no config of ours: width // vocab_width
    torch.save({"model": sd, "config": "not a dict"}, tmp_path / "odd.pt")
    assert load_vq_embedding(tmp_path / "odd.pt")[1]["vq_embed_heads"] == 4
    torch.save({"trainer": {"other": sd}, "model": sd}, tmp_path / "no_unitok.pt")
    assert sorted(load_vq_embedding(tmp_path / "no_unitok.pt")[0]) == part_keys
    for wrapper in ("state_dict", "module"):
        torch.save({wrapper: ema}, tmp_path / f"{wrapper}.pt")
        part, _ = load_vq_embedding(tmp_path / f"{wrapper}.pt")
        assert sorted(part) == part_keys and all(torch.equal(part[k], ema[k]) for k in part)
    torch.save([sd], tmp_path / "list.pt")  # not a dict at all
    with pytest.raises(CheckpointError, match="checkpoint holds a list, not a state dict"):
        load_vq_embedding(tmp_path / "list.pt")
    for drop in ("quantizer.codebooks.0.codebook.weight", "post_quant_proj.proj.weight"):
        torch.save({k: v for k, v in sd.items() if k != drop}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError) as err:
            load_vq_embedding(tmp_path / "bad.pt")
        keys = sorted(k for k in sd if k != drop)[:5]
        assert str(err.value) == (f"{tmp_path / 'bad.pt'}: not a MedITok tokenizer checkpoint (no quantizer.codebooks.* / "
                                  f"post_quant_proj.* weights); keys start with {keys}")


def test_load_gpt_applies_overrides_and_names_the_source_of_a_mismatch(tmp_path):
    from models.checkpoint import CheckpointError
    from models.gpt import Transformer, load_gpt
    config = tiny_args()
    model = Transformer(config)
    torch.save({"model": model.state_dict(), "config": asdict(config)}, tmp_path / "ours.pt")
    loaded, ckpt = load_gpt(tmp_path / "ours.pt", cls_token_num=2, class_dropout_prob=0.2)  # no shape depends on them
    assert (loaded.config.cls_token_num, loaded.config.class_dropout_prob) == (2, 0.2) and not loaded.training
    assert ckpt["config"] == asdict(config)  # the raw checkpoint, not the overridden config
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # real tensors, not the meta placeholders
    assert loaded.config.cond_rotation == "zero"
    # prefer_ema=False still takes the EMA weights when they are the only ones.
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"ema": ema, "config": asdict(config)}, tmp_path / "ema_only.pt")
    only, _ = load_gpt(tmp_path / "ema_only.pt", prefer_ema=False)
    assert all(torch.equal(only.state_dict()[k], ema[k]) for k in ema)
    for wrapper in ("state_dict", "module"):  # other trainers' wrapper keys
        torch.save({wrapper: ema, "config": asdict(config)}, tmp_path / f"{wrapper}.pt")
        other, _ = load_gpt(tmp_path / f"{wrapper}.pt")
        assert all(torch.equal(other.state_dict()[k], ema[k]) for k in ema)
    sd = model.state_dict()
    del sd["norm.weight"]
    for name, obj, where in (("plain.pt", sd, "plain"), ("ema.pt", {"ema": sd, "config": asdict(config)}, "ema")):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            load_gpt(tmp_path / name, n_head=4, block_size=16, multiple_of=32) if where == "plain" else load_gpt(tmp_path / name)
        assert f"{tmp_path / name} [{where}] as {{" in str(err.value) and "norm.weight" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Token embeddings from the tokenizer (VQTokenEmbedder)
# ----------------------------------------------------------------------------------------------
def _vq_model(**kw):
    from models.gpt import Transformer
    from test_gpt import randomize
    # 3 codebooks of 16 codes, latent width 12 (4 per codebook), post_quant_proj 12 -> 48 with 2 heads.
    config = tiny_args(**{"vocab_size": 48, "num_codebooks": 3, "vq_embed_width": 48, "vq_embed_vocab_width": 12,
                          "vq_embed_heads": 2, **kw})
    return randomize(Transformer(config), seed=3, std=0.2)


def test_vq_projector_is_the_released_layernorm_gelu_mlp():
    """mm_projector = Linear(GELU(Linear(LayerNorm(x, eps 1e-6)))) with exact GELU, as the released
    CustomTokenEmbedder; features whose variance is ~1e-6 make the eps matter, large ones the GELU form."""
    emb = _vq_model().tok_embeddings.eval()
    norm, fc1, fc2 = emb.mm_projector[0], emb.mm_projector[1], emb.mm_projector[3]
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    for scale in (1e-3, 30.0):
        xs = x * scale
        ln = (xs - xs.mean(-1, keepdim=True)) / torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + 1e-6)
        h = (ln * norm.weight + norm.bias) @ fc1.weight.T + fc1.bias
        expected = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ fc2.weight.T + fc2.bias
        torch.testing.assert_close(emb.mm_projector(xs), expected, rtol=1e-4, atol=1e-5)


def test_vq_embedder_calls_outside_decoding_are_independent_and_errors_are_named():
    from models.checkpoint import CheckpointError
    emb = _vq_model().tok_embeddings.eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 16, (2, 3, 4), generator=g), torch.randint(0, 16, (2, 3, 4), generator=g)
    with torch.no_grad():
        expected_b = emb.mm_projector(emb.post_quant_proj(emb.quantizer.idx_to_f(b)))
        emb(a)
        torch.testing.assert_close(emb(b), expected_b)  # nothing carried over from the call before
    assert emb.decoding is False and emb.history is None
    # The tokenizer part is frozen: only the projector is trainable (an optimizer over trainable parameters skips it).
    assert [n for n, p in emb.named_parameters() if p.requires_grad] == [
        f"mm_projector.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")]
    with pytest.raises(ValueError) as err:
        emb(torch.zeros(2, 2, 4, dtype=torch.long))
    assert str(err.value) == "codes have 2 codebooks, the model expects 3"
    # The tokenizer part loads strictly, and a mismatch names the part and the key.
    part = {f"quantizer.{k}": v for k, v in emb.quantizer.state_dict().items()}
    part.update({f"post_quant_proj.{k}": v for k, v in emb.post_quant_proj.state_dict().items()})
    emb.load_tokenizer(part, context="tok.pt")
    for drop, where in (("quantizer.codebooks.1.codebook.weight", "quantizer"), ("post_quant_proj.norm1.bias", "post_quant_proj")):
        with pytest.raises(CheckpointError) as err:
            emb.load_tokenizer({k: v for k, v in part.items() if k != drop}, context="tok.pt")
        assert f"(tok.pt [{where}])" in str(err.value) and drop[len(where) + 1:] in str(err.value)
    with pytest.raises(CheckpointError) as err:  # without a context: the part alone
        emb.load_tokenizer({k: v for k, v in part.items() if k != "post_quant_proj.norm1.bias"})
    assert "( [post_quant_proj])" in str(err.value)
    # A bf16 model reads the float32 code vectors in its own dtype.
    half = _vq_model().tok_embeddings.eval().to(torch.bfloat16)
    with torch.no_grad():
        assert half(b).dtype == torch.bfloat16


def test_vq_embedder_decoding_keeps_the_history_and_follows_a_shrunk_batch():
    """While decoding, position s is embedded with codes 0..s (as when the whole prefix is embedded at once);
    when guidance stops, the batch keeps its first (conditional) half."""
    emb = _vq_model().tok_embeddings.eval()
    codes = torch.randint(0, 16, (4, 3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = emb(codes)  # [4, 5, dim]
        emb.start_decoding()
        first = emb(codes[:, :, :2])
        steps = [emb(codes[:, :, s:s + 1]) for s in (2, 3)]
        last = emb(codes[:2, :, 4:5])  # the uncond half dropped
        emb.stop_decoding()
    torch.testing.assert_close(first, whole[:, :2])
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, 2:4])
    torch.testing.assert_close(last, whole[:2, 4:5])
    assert emb.history is None and emb.decoding is False
