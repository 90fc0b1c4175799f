"""Text-to-image GPT: caption projection, null caption, padding masks, cached sampling, checkpoints."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from models.generate import generate, generate_naive
from models.gpt import ModelArgs, Transformer, apply_rotary_emb, infer_config, load_gpt, precompute_freqs_cis_2d
from models.text_encoder import WordVocab
from test_gpt import one_thread, randomize, tiny_args  # noqa: F401 (by basename: torch-fidelity ships a top-level `tests`)

T, CAPTION_DIM = 5, 24


def t2i_args(**kw):
    return tiny_args(model_type="t2i", cls_token_num=T, caption_dim=CAPTION_DIM, **kw)


def captions(B=3, seed=0, lengths=(2, 5, 3)):
    """Left-padded caption features [B, T, CAPTION_DIM] (zeros at padding) and their masks [B, T]."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, CAPTION_DIM, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        mask[b, T - n:] = True
    return feats * mask[..., None], mask


def scramble_padding(cond, mask, seed=1):
    """The same captions with random content at the padded positions."""
    g = torch.Generator().manual_seed(seed)
    if cond.dtype.is_floating_point:
        noise = torch.randn(cond.shape, generator=g) * 5
        return torch.where(mask[..., None], cond, noise)
    return torch.where(mask, cond, torch.randint(1, 20, cond.shape, generator=g))


def model_and_caption(builtin: bool, seed=0):
    if builtin:
        model = randomize(Transformer(t2i_args(text_vocab_size=20, text_layers=1)), seed=seed).eval()
        vocab = WordVocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(18)])
        cond, mask = vocab.encode(["w3 w7", "w1 w2 w3 w4 w5 w6", "w9 w0 w11"], T)  # the second is cut to T words
    else:
        model = randomize(Transformer(t2i_args()), seed=seed).eval()
        cond, mask = captions()
    return model, cond, mask


def test_caption_embedder_uses_llamagen_key_names():
    sd = Transformer(t2i_args()).state_dict()
    assert sd["cls_embedding.cap_proj.fc1.weight"].shape == (64, CAPTION_DIM)
    assert sd["cls_embedding.cap_proj.fc2.weight"].shape == (64, 64)
    assert sd["cls_embedding.uncond_embedding"].shape == (T, CAPTION_DIM)
    assert not any(k.startswith("cls_embedding.embedding_table") or k.startswith("text_encoder") for k in sd)


@pytest.mark.parametrize("builtin", [False, True], ids=["features", "builtin-encoder"])
def test_padded_positions_are_irrelevant(builtin):
    model, cond, mask = model_and_caption(builtin)
    other = scramble_padding(cond, mask)
    assert not torch.equal(other, cond)
    codes = torch.randint(0, model.config.sub_vocab_size, (3, model.config.num_codebooks, model.block_size))
    with torch.no_grad():
        a, _ = model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
        b, _ = model(codes[:, :, :-1], other, targets=codes, cond_mask=mask)
        # Without the mask the padding content does reach the images: the check above can fail.
        c, _ = model(codes[:, :, :-1], other, targets=codes)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3
    for cfg in (1.0, 3.0):
        x = generate(model, cond, model.block_size, cfg_scale=cfg, sample_logits=False, cond_mask=mask)
        y = generate(model, other, model.block_size, cfg_scale=cfg, sample_logits=False, cond_mask=mask)
        assert torch.equal(x, y)


@pytest.mark.parametrize("builtin", [False, True], ids=["features", "builtin-encoder"])
@pytest.mark.parametrize("guidance", [dict(cfg_scale=1.0), dict(cfg_scale=3.0), dict(cfg_scale=2.0, cfg_schedule="linear"),
                                      dict(cfg_scale=4.0, cfg_interval=3)], ids=["none", "constant", "linear", "interval"])
def test_cached_greedy_equals_uncached(builtin, guidance):
    model, cond, mask = model_and_caption(builtin, seed=2)
    cached = generate(model, cond, model.block_size, sample_logits=False, cond_mask=mask, **guidance)
    naive = generate_naive(model, cond, model.block_size, sample_logits=False, cond_mask=mask, **guidance)
    assert torch.equal(cached, naive)
    # Sampling with a seeded generator draws the same codes too.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = generate(model, cond, model.block_size, generator=g1, cond_mask=mask, **guidance)
    s2 = generate_naive(model, cond, model.block_size, generator=g2, cond_mask=mask, **guidance)
    assert torch.equal(s1, s2)


def test_guidance_uses_the_null_caption():
    """The unconditional half is the null caption: with cfg the result depends on uncond_embedding, and
    with the caption replaced by the null caption itself guidance changes nothing."""
    model, cond, mask = model_and_caption(False, seed=3)
    base = generate(model, cond, model.block_size, cfg_scale=3.0, sample_logits=False, cond_mask=mask)
    null = model.cls_embedding.uncond_embedding.detach().expand(3, -1, -1).clone()
    for cfg in (1.0, 3.0, 7.0):
        assert torch.equal(generate(model, null, model.block_size, cfg_scale=cfg, sample_logits=False, cond_mask=mask),
                           generate(model, null, model.block_size, cfg_scale=1.0, sample_logits=False, cond_mask=mask))
    with torch.no_grad():
        model.cls_embedding.uncond_embedding.mul_(-3.0)
    assert not torch.equal(base, generate(model, cond, model.block_size, cfg_scale=3.0, sample_logits=False, cond_mask=mask))


def test_caption_dropout_in_training():
    torch.manual_seed(0)
    model = randomize(Transformer(t2i_args(class_dropout_prob=1.0))).train()  # every caption dropped
    cond, mask = captions()
    codes = torch.randint(0, model.config.sub_vocab_size, (3, model.config.num_codebooks, model.block_size))
    a, _ = model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
    b, _ = model(codes[:, :, :-1], torch.randn_like(cond), targets=codes, cond_mask=mask)
    torch.testing.assert_close(a, b)
    model.eval()  # no dropping in eval mode
    with torch.no_grad():
        c, _ = model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
        d, _ = model(codes[:, :, :-1], torch.randn_like(cond), targets=codes, cond_mask=mask)
    assert (c - d).abs().max() > 1e-3


def test_wrong_condition_is_refused():
    model, cond, mask = model_and_caption(False)
    with pytest.raises(ValueError, match="caption features"):
        generate(model, torch.tensor([0, 1]), model.block_size)
    with pytest.raises(ValueError, match="cond_mask"):
        generate(model, cond, model.block_size, cond_mask=mask[:, 1:])
    builtin, ids, _ = model_and_caption(True)
    with pytest.raises(ValueError, match="word ids"):
        generate(builtin, cond, builtin.block_size)


@pytest.mark.parametrize("builtin", [False, True], ids=["features", "builtin-encoder"])
def test_checkpoint_round_trip(tmp_path, builtin):
    model, cond, mask = model_and_caption(builtin, seed=4)
    codes = torch.randint(0, model.config.sub_vocab_size, (3, model.config.num_codebooks, model.block_size))
    with torch.no_grad():
        expected, _ = model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
    ours, plain = tmp_path / "ours.pt", tmp_path / "plain.pt"
    torch.save({"config": asdict(model.config), "model": model.state_dict()}, ours)
    torch.save({"model": model.state_dict()}, plain)  # the released layout: no config, shapes only
    inferred = infer_config(model.state_dict(), n_head=model.config.n_head, block_size=model.block_size,
                            multiple_of=model.config.multiple_of)
    assert inferred["model_type"] == "t2i" and inferred["cls_token_num"] == T and inferred["caption_dim"] == CAPTION_DIM
    assert inferred["cond_rotation"] == "zero"  # the released/LlamaGen layout; ours is told below
    for path, kw in ((ours, {}), (plain, dict(n_head=model.config.n_head, block_size=model.block_size,
                                               multiple_of=model.config.multiple_of, cond_rotation="identity"))):
        loaded, _ = load_gpt(path, **kw)
        assert loaded.config.model_type == "t2i" and loaded.config.text_vocab_size == model.config.text_vocab_size
        with torch.no_grad():
            got, _ = loaded(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A missing caption key is named.
    sd = model.state_dict()
    del sd["cls_embedding.uncond_embedding"]
    torch.save({"config": asdict(model.config), "model": sd}, ours)
    with pytest.raises(Exception, match="uncond_embedding"):
        load_gpt(ours)


def test_condition_rotation_rows():
    """zero: the condition positions' queries and keys become 0 (LlamaGen); identity: they stay as they are.
    The image positions' rows are the same either way."""
    zero = precompute_freqs_cis_2d(4, 16, 10000, T, "zero")
    ident = precompute_freqs_cis_2d(4, 16, 10000, T, "identity")
    assert zero.shape == ident.shape == (T + 16, 8, 2)
    assert torch.equal(zero[T:], ident[T:]) and zero[T + 1:].abs().sum() > 0
    x = torch.randn(2, T + 16, 3, 16)
    assert torch.equal(apply_rotary_emb(x, zero)[:, :T], torch.zeros(2, T, 3, 16))
    assert torch.equal(apply_rotary_emb(x, ident)[:, :T], x[:, :T])
    with pytest.raises(ValueError, match="cond_rotation"):
        precompute_freqs_cis_2d(4, 16, 10000, T, "none")
    # Defaults: t2i reads its caption by content; c2i keeps the released table (one class position).
    assert ModelArgs(model_type="t2i").cond_rotation == "identity" and ModelArgs().cond_rotation == "zero"
    with pytest.raises(ValueError, match="cond_rotation"):
        ModelArgs(cond_rotation="half")


@pytest.mark.parametrize("rotation", ["zero", "identity"])
def test_zero_rotation_makes_caption_attention_content_blind(rotation, monkeypatch):
    """The attention logits of image queries over caption keys: with "zero" they are all exactly 0 (every
    caption position weighs the same, whatever its words: the caption reaches the image as a mean);
    with "identity" they depend on the caption positions' content."""
    import models.gpt as gpt_module

    seen = []
    sdpa = gpt_module.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q @ k.transpose(-1, -2))  # [B, H, S, S] logits before scaling and masking
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention", spy)
    model = randomize(Transformer(t2i_args(cond_rotation=rotation)), seed=5).eval()
    cond, mask = captions(B=1, lengths=(T,))
    codes = torch.randint(0, model.config.sub_vocab_size, (1, model.config.num_codebooks, model.block_size))
    with torch.no_grad():
        model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)
    main_stack = [s for s in seen if s.shape[-1] == T + model.block_size - 1][: model.config.n_layer]
    assert len(main_stack) == model.config.n_layer
    for logits in main_stack:
        image_to_caption = logits[..., T:, :T]
        if rotation == "zero":
            assert torch.equal(image_to_caption, torch.zeros_like(image_to_caption))
        else:
            assert image_to_caption.std(-1).min() > 1e-3  # each query ranks the caption positions differently


def test_checkpoint_from_before_cond_rotation_loads_as_trained(tmp_path):
    """A t2i checkpoint whose config lacks cond_rotation was trained with the zero table: it loads so."""
    model = randomize(Transformer(t2i_args(cond_rotation="zero")), seed=6).eval()
    cfg = asdict(model.config)
    del cfg["cond_rotation"]
    torch.save({"config": cfg, "model": model.state_dict()}, tmp_path / "old.pt")
    loaded, _ = load_gpt(tmp_path / "old.pt")
    assert loaded.config.cond_rotation == "zero"
    cond, mask = captions()
    codes = torch.randint(0, model.config.sub_vocab_size, (3, model.config.num_codebooks, model.block_size))
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)[0],
                                   model(codes[:, :, :-1], cond, targets=codes, cond_mask=mask)[0], rtol=0, atol=0)


def test_word_vocab():
    vocab = WordVocab.build(["T1-weighted brain MRI, axial slice", "brain MRI, coronal slice", "echo"])
    assert vocab.tokens[:2] == ["<pad>", "<unk>"] and vocab.tokens[2:5] == ["brain", "mri", "slice"]
    ids, mask = vocab.encode(["brain MRI unknownword", "echo"], 4)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert ids[0, 1:].tolist() == [vocab.index["brain"], vocab.index["mri"], 1] and ids[1, 3] == vocab.index["echo"]
    with pytest.raises(ValueError, match="no words"):
        vocab.encode(["..."], 4)


def test_quickstart_captions_and_levels():
    from scripts.quickstart_t2i import all_prompts, caption, level_errors, levels, orientation_only

    rows = [{"identifier": f"images/{name}/{name}_{i:03d}.png", "label_name": name}
            for name in ("brain_mri_axial", "brain_mri_sagittal") for i in (0, 5, 10)]
    rows.append({"identifier": "images/echocardiography/echocardiography_007.png", "label_name": "echocardiography"})
    lv = levels(rows)
    assert lv == [0.0, 0.5, 1.0, 1.0, 0.0, 1.0, None]  # sagittal: distance from the midline
    texts = [caption(r["label_name"], v) for r, v in zip(rows, lv)]
    assert texts[:3] == [f"T1-weighted brain MRI, axial slice, {w} third" for w in ("lower", "middle", "upper")]
    assert texts[4] == "T1-weighted brain MRI, sagittal slice, medial third" and texts[6] == "echocardiography frame"
    for r, t in zip(rows, texts):
        r.update(text=t, split="train")
    rows[1]["split"] = "heldout_caption"
    extra = orientation_only(rows)  # brain training rows only, their orientation alone
    assert [r["identifier"] for r in extra] == [rows[i]["identifier"] for i in (0, 2, 3, 4, 5)]
    assert [r["text"] for r in extra] == ["T1-weighted brain MRI, axial slice"] * 2 + ["T1-weighted brain MRI, sagittal slice"] * 3
    assert rows[0]["text"].endswith("lower third")  # the originals keep their captions
    prompts = all_prompts({0: "brain_mri_axial", 3: "echocardiography"})
    assert [p["level"] for p in prompts] == [1 / 6, 0.5, 5 / 6, None] and prompts[3]["label"] == 3
    # The nearest-neighbour level: a reference image asked for its own level has no error; another level does.
    refs = torch.linspace(-1, 1, 4)[:, None, None, None].expand(4, 3, 8, 8)
    ref_levels = torch.tensor([0.0, 0.3, 0.6, 0.9])
    err = level_errors(refs, np.zeros(4, int), np.array([0.0, 0.3, 0.6, 0.0]), {0: (refs, ref_levels)})
    np.testing.assert_allclose(err, [0, 0, 0, 0.9], atol=1e-6)
