"""The tokenizer's encode/decode path written out by hand (tests added for mutation testing, docs/MUTATION.md).

Each expected value is built here from the model's parameters with explicit indexing and the formulas of
the official release (`../shared/reference/README.md`): per-codebook cosine argmax over normalised chunks,
normalised code vectors concatenated in codebook order, tokens laid out row-major on an h x w grid. The
grids are not square (h != w), so a transposed or swapped grid anywhere changes the result.
"""
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, atomic_save
from models.meditok import (
    MEDITOK_CONFIGS,
    STEM_STRIDE,
    MedITok,
    MedITokConfig,
    build_meditok,
    infer_config,
    save_meditok,
)

TINY = "MedITok-Tiny"


@pytest.fixture  # built per test (cheap), so that mutmut sees every test reach MedITok.__init__
def model():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = MEDITOK_CONFIGS[TINY]
    m = MedITok(cfg, cfg.downsample * 4).eval()
    # Make the decoder's output leave [-1, 1] by far, so that the clamp of idx_to_img is visible.
    with torch.no_grad():
        for p in m.decoder.up_conv4.parameters():
            p.mul_(50)
    yield m
    torch.set_num_threads(threads)


def wide_images(model, h, w, n=2, seed=0):
    d = model.config.downsample
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.in_chans, h * d, w * d, generator=g) * 2 - 1


def hand_indices(model, latent):
    """latent [B, L, vocab_width] -> [B, K, L]: argmax cosine per chunk, codebook vectors normalised."""
    K = model.num_codebooks
    chunk = model.vocab_width // K
    out = []
    for k in range(K):
        f = latent[..., k * chunk:(k + 1) * chunk]
        f = f / f.norm(dim=-1, keepdim=True)
        e = model.quantizer.codebooks[k].codebook.weight
        e = e / e.norm(dim=-1, keepdim=True)
        out.append((f @ e.T).argmax(-1))
    return torch.stack(out, 1)


def hand_codes(model, idx):
    """idx [B, K, L] -> [B, L, vocab_width]: the normalised code vectors, codebook k in chunk k."""
    parts = []
    for k in range(model.num_codebooks):
        e = model.quantizer.codebooks[k].codebook.weight[idx[:, k]]  # [B, L, chunk]
        parts.append(e / e.norm(dim=-1, keepdim=True))
    return torch.cat(parts, -1)


def hand_grid(tokens, h, w):
    """tokens [B, L, C] with L = h * w in row-major order -> [B, C, h, w], element by element."""
    B, L, C = tokens.shape
    grid = torch.empty(B, C, h, w)
    for i in range(h):
        for j in range(w):
            grid[:, :, i, j] = tokens[:, i * w + j, :]
    return grid


def hand_decode(model, codes, h, w):
    """codes [B, L, vocab_width] -> image, unclamped: projection, ViT blocks, grid, conv upsampling."""
    dec = model.decoder
    t = dec.norm(dec.blocks(dec.norm_pre(model.post_quant_proj(codes))))
    return dec.up_conv4(dec.up_conv3(dec.up_conv2(dec.up_conv1(hand_grid(t, h, w)))))


@torch.no_grad()
def test_decoder_lays_tokens_out_row_major(model, monkeypatch):
    dec, h, w = model.decoder, 2, 3
    tokens = torch.randn(2, h * w, model.config.width, generator=torch.Generator().manual_seed(1))
    seen = []
    monkeypatch.setattr(dec, "upsample", lambda g: seen.append(g) or g)
    dec(tokens, (h, w))
    expected = hand_grid(dec.norm(dec.blocks(dec.norm_pre(tokens))), h, w)
    assert seen[0].shape == (2, model.config.width, h, w)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


@torch.no_grad()
def test_encode_path_by_hand(model):
    h, w = 2, 3
    x = wide_images(model, h, w)
    enc = model.encoder(x)  # [B, L, width]
    assert enc.shape == (2, h * w, model.config.width)
    latent = model.quant_proj(enc)
    idx = hand_indices(model, latent)
    assert torch.equal(model.img_to_idx(x), idx)
    codes = hand_codes(model, idx)
    torch.testing.assert_close(model.encode_image_vq(x), codes, rtol=0, atol=0)
    # latent_to_idx of a [B, vocab_width, h, w] grid, and of tokens [B, L, vocab_width]
    assert torch.equal(model.latent_to_idx(hand_grid(codes, h, w)), idx)
    assert torch.equal(model.latent_to_idx(codes), idx)
    torch.testing.assert_close(model.forward_features(x), enc.mean(1))
    feats = model.projection(model.fc_norm(model.post_quant_proj(codes).mean(1)))
    torch.testing.assert_close(model.encode_image(x), feats)
    torch.testing.assert_close(model.encode_image(x, normalize=True), feats / feats.norm(dim=-1, keepdim=True))


@torch.no_grad()
def test_reconstruction_and_forward_by_hand(model):
    h, w = 2, 3
    x = wide_images(model, h, w, seed=2)
    idx = hand_indices(model, model.quant_proj(model.encoder(x)))
    rec = hand_decode(model, hand_codes(model, idx), h, w)
    assert rec.shape == x.shape
    assert rec.min() < -2 and rec.max() > 2  # the clamp below matters at both ends
    torch.testing.assert_close(model.img_to_reconstructed_img(x), rec.clamp(-1, 1))
    out = model(x)
    assert torch.equal(out["idx"], idx)
    # the scaled output layer amplifies float rounding (the code vectors are normalised in another order)
    torch.testing.assert_close(out["rec"], rec, rtol=1e-3, atol=1e-2)


@torch.no_grad()
def test_idx_to_img_by_hand(model):
    K, n = model.num_codebooks, model.codebook_size
    g = torch.Generator().manual_seed(3)
    # [B, K, h, w] with h != w
    idx = torch.randint(0, n, (2, K, 2, 3), generator=g)
    rec = hand_decode(model, hand_codes(model, idx.flatten(2)), 2, 3)
    assert rec.min() < -2 and rec.max() > 2
    torch.testing.assert_close(model.idx_to_img(idx), rec.clamp(-1, 1))
    # [B, K, L] with a square L
    idx = torch.randint(0, n, (1, K, 9), generator=g)
    torch.testing.assert_close(model.idx_to_img(idx), hand_decode(model, hand_codes(model, idx), 3, 3).clamp(-1, 1))


def test_shape_errors_name_the_sizes(model):
    d = model.config.downsample
    x = torch.zeros(1, model.in_chans, 2 * d, 3 * d + 1)
    with pytest.raises(ValueError, match=f"^image size {2 * d}x{3 * d + 1} is not a multiple of the downsampling factor {d}$"):
        model.img_to_reconstructed_img(x)
    x = torch.zeros(1, model.in_chans, 2 * d + 1, 3 * d)
    with pytest.raises(ValueError, match=f"^image size {2 * d + 1}x{3 * d} is not"):
        model(x)
    with pytest.raises(ValueError, match=r"^6 tokens do not form a square grid; pass indices as \[B, K, h, w\]$"):
        model.idx_to_img(torch.zeros(1, model.num_codebooks, 6, dtype=torch.long))
    assert MedITok._square_hw(16) == (4, 4) and MedITok._square_hw(1) == (1, 1)


def test_config_rules():
    c = MedITokConfig(conv_widths=[8, 16], decoder_depths=[1, 2])
    assert c.conv_widths == (8, 16) and c.decoder_depths == (1, 2) and isinstance(c.conv_widths, tuple)
    assert c.codebook_size == 32768 // 8 and MedITokConfig(vocab_size=100, num_codebooks=4).codebook_size == 25
    with pytest.raises(ValueError, match=f"^MedITokConfig.downsample must be {STEM_STRIDE} or {2 * STEM_STRIDE}, got 4$"):
        MedITokConfig(downsample=4)
    assert MedITokConfig(downsample=STEM_STRIDE).downsample == STEM_STRIDE
    with pytest.raises(ValueError, match="^width=96 and vocab_width=64 must divide one another$"):
        MedITokConfig(width=96, vocab_width=64)
    # either direction of divisibility is accepted
    assert MedITokConfig(width=64, vocab_width=128).projection_heads == 1
    assert MedITokConfig(width=1024, vocab_width=64).projection_heads == 16
    assert MedITokConfig(width=1024, vocab_width=64, proj_heads=3).projection_heads == 3
    c = MedITokConfig(downsample=16)
    assert c.grid_size(256) == 16 and c.grid_size(16) == 1 and type(c.grid_size(256)) is int
    with pytest.raises(ValueError, match="^img_size=40 is not a multiple of the downsampling factor 16$"):
        c.grid_size(40)


def test_trunk_settings(model):
    """Settings that leave no trace in state-dict keys: norm eps, frozen zero pos_embed, token output."""
    enc = model.encoder
    assert enc.pos_embed.shape == (1, 1, model.config.width) and not enc.pos_embed.requires_grad
    assert torch.count_nonzero(enc.pos_embed) == 0
    stem_norm = enc.patch_embed.backbone.stem.norm1
    assert stem_norm.eps == 1e-6
    assert enc.num_prefix_tokens == 0 and enc.global_pool == ""


@torch.no_grad()
def test_trunk_mlp_is_the_tanh_geglu(model):
    """Every ViT block's MLP, encoder and decoder: w2(gelu_tanh(w0 LN(x)) * w1 LN(x)), hidden = mlp_ratio * width."""
    width = model.config.width
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(4))
    for blocks in (model.encoder.blocks, model.decoder.blocks):
        mlp = blocks[0].mlp
        assert mlp.w0.out_features == int(model.config.mlp_ratio * width)
        mlp.w0.weight.mul_(30)  # gate inputs of a few units, where tanh-GELU and exact GELU differ visibly
        mlp.w1.weight.mul_(30)
        h = F.layer_norm(x, (width,), mlp.norm.weight, mlp.norm.bias, eps=1e-6)
        expected = mlp.w2(F.gelu(mlp.w0(h), approximate="tanh") * mlp.w1(h))
        exact_gelu = mlp.w2(F.gelu(mlp.w0(h)) * mlp.w1(h))
        tol = 2e-6 * expected.abs().max().item()
        assert (expected - exact_gelu).abs().max() > 10 * tol
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=tol)


@torch.no_grad()
def test_config_fields_reach_the_trunk():
    """in_chans and mlp_ratio other than timm's builder defaults (3 and 2.0) change the model."""
    cfg = replace(MEDITOK_CONFIGS[TINY], in_chans=1, mlp_ratio=1.0)
    m = MedITok(cfg, cfg.downsample * 2).eval()
    for blocks in (m.encoder.blocks, m.decoder.blocks):
        assert blocks[0].mlp.w0.out_features == cfg.width
    x = torch.rand(1, 1, cfg.downsample * 2, cfg.downsample * 3) * 2 - 1
    assert m.img_to_idx(x).shape == (1, cfg.num_codebooks, 6)
    assert m.img_to_reconstructed_img(x).shape == x.shape


def test_config_reaches_the_quantizer_and_head():
    cfg = replace(MEDITOK_CONFIGS[TINY], vq_beta=0.5, use_entropy_loss=True, entropy_temp=0.05)
    with torch.device("meta"):
        m = MedITok(cfg, cfg.downsample * 2)
    q = m.quantizer
    assert (q.beta, q.use_entropy_loss, q.entropy_temp) == (0.5, True, 0.05)
    assert m.codebook_size == cfg.vocab_size // cfg.num_codebooks
    # the alignment head: LayerNorm eps 1e-6 (the full official reference, tests/test_meditok_full.py,
    # matches with it) and CLIP's initial logit scale log(1 / 0.07)
    assert m.fc_norm.eps == 1e-6
    with torch.device("cpu"):
        fresh = MedITok(MEDITOK_CONFIGS[TINY], MEDITOK_CONFIGS[TINY].downsample * 2)
    assert fresh.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


# ----------------------------------------------------------------------------------------------
# Loading and saving: config inference, wrapper keys, image size, messages (docs/MUTATION.md)
# ----------------------------------------------------------------------------------------------
DATA = Path(__file__).parent / "data"


def released_state_dict():
    """The released tokenizer's keys and shapes (tests/data/meditok_official.keys.tsv) as meta tensors."""
    sd = {}
    for line in open(DATA / "meditok_official.keys.tsv"):
        name, shape, dtype = line.rstrip("\n").split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        sd[name] = torch.empty(dims, dtype=getattr(torch, dtype), device="meta")
    return sd


def test_infer_config_of_the_released_key_list():
    cfg = infer_config(released_state_dict())
    # the released architecture (../shared/reference/README.md): ViTamin-L trunks of 31 blocks, 16 heads,
    # 16x downsampling, 8 x 4096 codes of width 8, decoder widths (1024, 320, 160) with 4 and 2 blocks
    assert (cfg.width, cfg.depth, cfg.decoder_depth, cfg.num_heads, cfg.downsample) == (1024, 31, 31, 16, 16)
    assert (cfg.vocab_size, cfg.vocab_width, cfg.num_codebooks, cfg.embed_dim, cfg.in_chans) == (32768, 64, 8, 768, 3)
    assert (cfg.stem_width, cfg.conv_widths, cfg.conv_depths) == (160, (160, 320), (2, 4))
    assert (cfg.decoder_widths, cfg.decoder_depths, cfg.decoder_expand_ratio) == ((320, 160), (4, 2), 4.0)
    assert cfg == MEDITOK_CONFIGS["MedITok-L"]


@pytest.mark.parametrize("key", ["encoder.norm.weight", "quant_proj.proj.weight", "decoder.up_conv4.conv1.conv.weight",
                                 "projection.weight"])
def test_infer_config_names_a_missing_key(key):
    sd = released_state_dict()
    del sd[key]
    with pytest.raises(CheckpointError, match=f"^cannot infer the MedITok config: key '{re.escape(key)}' is missing "
                                              "from the state dict$"):
        infer_config(sd)


def unregistered(width, num_heads):
    """A config whose every shape-visible field differs from MedITokConfig's defaults (the fallback base)."""
    return replace(MedITokConfig(), stem_width=8, conv_widths=(16, 24), conv_depths=(1, 2), width=width, depth=3,
                   num_heads=num_heads, vocab_size=40, vocab_width=16, num_codebooks=4, decoder_depth=2,
                   decoder_widths=(24, 8), decoder_depths=(2, 1), decoder_expand_ratio=3.0, embed_dim=40,
                   in_chans=1)


@pytest.mark.parametrize("width, num_heads", [(32, 1), (160, 2), (192, 3)])
def test_infer_config_of_an_unregistered_width(width, num_heads):
    """A width no registered config has: ViTamin's 64-wide heads (160 -> 2, 192 -> 3, at least 1 for 32),
    16x downsampling, and MedITokConfig's defaults for what shapes do not show."""
    assert width not in {c.width for c in MEDITOK_CONFIGS.values()}
    cfg = unregistered(width, num_heads)
    with torch.device("meta"):
        sd = MedITok(cfg, 32).state_dict()
    assert infer_config(sd) == cfg


def tiny_model(img_size=None, **fields):
    torch.manual_seed(0)
    cfg = replace(MEDITOK_CONFIGS[TINY], **fields)
    return MedITok(cfg, img_size or cfg.downsample * 2).eval()


def same_weights(model, sd):
    ours = model.state_dict()
    return ours.keys() == sd.keys() and all(torch.equal(ours[k], v) for k, v in sd.items())


def test_a_plain_state_dict_of_an_unregistered_width_loads(tmp_path):
    torch.manual_seed(0)
    cfg = unregistered(32, 1)
    model = MedITok(cfg, 32).eval()
    atomic_save(model.state_dict(), tmp_path / "plain.pth")
    loaded = build_meditok(tmp_path / "plain.pth")
    assert loaded.config == cfg and same_weights(loaded, model.state_dict())
    assert loaded.img_size == 256  # nothing stored: the released training resolution
    x = torch.rand(1, 1, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.img_to_idx(x), model.img_to_idx(x))


def test_saved_config_keeps_what_shapes_do_not_show(tmp_path):
    model = tiny_model(img_size=24, num_heads=2, proj_heads=1, vq_beta=0.5, use_entropy_loss=True, entropy_temp=0.05)
    assert infer_config(model.state_dict()) != model.config  # inference alone would lose these fields
    save_meditok(model, tmp_path / "t.pt", extra={"step": 3})
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    assert set(ckpt) == {"kind", "config", "img_size", "model", "step"}
    assert ckpt["kind"] == "meditok" and ckpt["config"] == asdict(model.config) and ckpt["step"] == 3
    assert ckpt["img_size"] == 24 and type(ckpt["img_size"]) is int
    assert same_weights(model, ckpt["model"])
    rebuilt = build_meditok(tmp_path / "t.pt")
    assert rebuilt.config == model.config and rebuilt.img_size == 24 and not rebuilt.training
    # a stored config wins over a registered name (which only stands in for a missing config)
    assert build_meditok(tmp_path / "t.pt", model_name=TINY).config == model.config
    # an explicit size wins over the stored one; overrides replace fields of the stored config
    again = build_meditok(tmp_path / "t.pt", img_size=40, vq_beta=0.75)
    assert again.img_size == 40 and again.grid_size == 5 and again.config == replace(model.config, vq_beta=0.75)
    assert again.quantizer.beta == 0.75 and same_weights(again, ckpt["model"])


def test_unknown_config_fields_are_named(tmp_path):
    model = tiny_model()
    atomic_save({"model": model.state_dict(), "config": {**asdict(model.config), "zeta": 1, "alpha": 2}},
                tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint config has fields this code does not know: "
                                              r"\['alpha', 'zeta'\]$"):
        build_meditok(tmp_path / "new.pt")


def test_mismatch_message_says_where_the_weights_and_config_came_from(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    cases = {
        "plain.pt": (sd, {}, "; config inferred from the state-dict shapes: MedITokConfig("),
        "wrapped.pt": ({"model": sd, "config": asdict(model.config)}, {}, " [model]; config stored in the checkpoint: "
                                                                          "MedITokConfig("),
        "named.pt": ({"ema": sd}, {"model_name": TINY}, f" [ema]; config registered config {TINY}: MedITokConfig("),
    }
    for name, (ckpt, kwargs, context) in cases.items():
        atomic_save(ckpt, tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            build_meditok(tmp_path / name, **kwargs)
        msg = str(err.value)
        assert msg.startswith(f"checkpoint does not match the model ({tmp_path / name}{context}"), (name, msg)
        assert "unexpected keys (1): extra.weight" in msg


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"^unknown MedITok model 'MedITok-XL'; choose from "
                                         r"\['MedITok-L', 'MedITok-B', 'MedITok-Tiny'\]$"):
        build_meditok(model_name="MedITok-XL")


def test_random_model_takes_name_size_and_overrides():
    d = MEDITOK_CONFIGS[TINY].downsample
    model = build_meditok(model_name=TINY, img_size=3 * d, vq_beta=0.5, embed_dim=32)
    assert model.config == replace(MEDITOK_CONFIGS[TINY], vq_beta=0.5, embed_dim=32)
    assert model.img_size == 3 * d and model.grid_size == 3 and not model.training
    assert model.projection.out_features == 32 and model.quantizer.beta == 0.5


def test_wrapper_keys_in_the_documented_order(tmp_path):
    """EMA weights first unless prefer_ema=False; then "model", "state_dict", "module" (EMA last)."""
    model = tiny_model()
    sd = model.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    cases = [  # (checkpoint, prefer_ema, which weights load)
        ({"module": sd}, True, sd), ({"state_dict": sd, "module": other}, True, sd),
        ({"module": sd, "ema": other}, True, other), ({"module": sd, "ema": other}, False, sd),
        ({"state_dict": sd, "ema": other}, False, sd), ({"ema": other}, False, other),
        ({"model": sd, "state_dict": other}, False, sd),
    ]
    for i, (ckpt, prefer_ema, expected) in enumerate(cases):
        atomic_save(ckpt, tmp_path / f"{i}.pt")
        loaded = build_meditok(tmp_path / f"{i}.pt", img_size=model.img_size, prefer_ema=prefer_ema)
        assert same_weights(loaded, expected), (list(ckpt), prefer_ema)


def test_loaded_tensors_are_real_and_keep_requires_grad(tmp_path):
    model = tiny_model()
    save_meditok(model, tmp_path / "t.pt")
    loaded = build_meditok(tmp_path / "t.pt")
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert not loaded.encoder.pos_embed.requires_grad  # frozen, as released
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "encoder.pos_embed")
    # weights loaded onto the meta device stay data-less: refused, naming the first ten tensors
    names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]][:10]
    with pytest.raises(CheckpointError) as err:
        build_meditok(tmp_path / "t.pt", device="meta")
    assert str(err.value) == f"{tmp_path / 't.pt'}: tensors left uninitialised after loading: {names}"
