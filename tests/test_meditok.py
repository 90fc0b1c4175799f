"""MedITok: official building blocks reproduced, the released key layout, loading, and VQ invariants."""
import argparse
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, atomic_save
from models.meditok import MEDITOK_CONFIGS, MedITok, build_meditok, infer_config, save_meditok
from models.meditok_blocks import AttnProjection, ConvUpsampler, GeGluMlp
from models.quantizer import MultiCodebookQuantizer

DATA = Path(__file__).parent / "data"
PARTS = torch.load(DATA / "meditok_parts_reference.pt", weights_only=True)
TINY = "MedITok-Tiny"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models run many small ops: on a small shared CPU, extra intra-op threads only contend
    (measured: a Tiny training step took 0.5 s with 1 thread, 6.6 s with 2 on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = MEDITOK_CONFIGS[TINY]
    return build_meditok(model_name=TINY, img_size=cfg.downsample * 4).eval()


def images(model, n=2, side=None, seed=0):
    side = side or model.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.in_chans, side, side, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Official building blocks (fixtures produced by the released code)
# ----------------------------------------------------------------------------------------------
BLOCKS = {"quant_proj": AttnProjection, "post_quant_proj": AttnProjection, "geglu_mlp": GeGluMlp,
          "decoder_upsampler": ConvUpsampler}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_matches_official(name):
    entry = PARTS[name]
    block = BLOCKS[name](**entry["args"]).eval()
    block.load_state_dict(entry["state_dict"], strict=True)
    with torch.no_grad():
        y = block(entry["x"])
    assert y.shape == entry["y"].shape
    assert rel_err(y, entry["y"]) <= 1e-5


def test_quantizer_matches_official():
    entry = PARTS["quantizer"]
    q = MultiCodebookQuantizer(**entry["args"]).eval()
    q.load_state_dict(entry["state_dict"], strict=True)
    with torch.no_grad():
        idx = q.f_to_idx(entry["features"])
        quantized, *_ = q(entry["features"])
    assert torch.equal(idx, entry["indices"])
    assert rel_err(q.idx_to_f(idx), entry["quantized"]) <= 1e-5
    assert rel_err(quantized, entry["quantized"]) <= 1e-5


def test_every_fixture_entry_is_tested():
    assert set(PARTS) == set(BLOCKS) | {"quantizer"}


# ----------------------------------------------------------------------------------------------
# Released layout and the larger configs (meta device: shapes without memory)
# ----------------------------------------------------------------------------------------------
def official_keys():
    rows = [line.rstrip("\n").split("\t") for line in open(DATA / "meditok_official.keys.tsv")]
    return {k: (() if s == "scalar" else tuple(int(d) for d in s.split("x")), dtype) for k, s, dtype in rows}


@pytest.fixture(scope="module")
def meta_models():
    """MedITok-L and -B built once on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return {name: MedITok(MEDITOK_CONFIGS[name], 256) for name in ("MedITok-L", "MedITok-B")}


def test_meditok_l_state_dict_equals_official(meta_models):
    sd = meta_models["MedITok-L"].state_dict()
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
    ref = official_keys()
    assert len(ref) == 1186
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


@pytest.mark.parametrize("name", ["MedITok-L", "MedITok-B"])
def test_infer_config_from_shapes(meta_models, name):
    # The released checkpoint carries no config: shapes alone must give back the registered one.
    assert infer_config(meta_models[name].state_dict()) == MEDITOK_CONFIGS[name]


def test_meditok_b_is_smaller_and_vitamin_b_wide(meta_models):
    b, large = meta_models["MedITok-B"], meta_models["MedITok-L"]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(b) < n(large) / 2
    assert b.encoder.embed_dim == 768 and len(b.encoder.blocks) == len(b.decoder.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MedITok-L", "MedITok-B"])
def test_large_configs_forward_backward_on_meta(meta_models, name):
    model = meta_models[name].train()
    cfg, B, side = model.config, 2, 256
    grid = side // cfg.downsample
    with torch.device("meta"):
        x = torch.empty(B, 3, side, side)
        out = model(x)
        (out["rec"].square().mean() + out["vq_loss"]).backward()
        model.eval()
        idx = model.img_to_idx(x)
        assert idx.shape == (B, cfg.num_codebooks, grid * grid)
        assert model.idx_to_img(idx.view(B, cfg.num_codebooks, grid, grid)).shape == x.shape
        assert model.encode_image_vq(x).shape == (B, grid * grid, cfg.vocab_width)
        assert model.encode_image(x).shape == (B, cfg.embed_dim)
        assert model.forward_features(x).shape == (B, cfg.width)
    assert out["rec"].shape == x.shape and out["usage"].shape == (cfg.num_codebooks,)
    assert model.encoder.patch_embed.backbone.stem.conv1.weight.grad is not None
    assert model.quantizer.codebooks[0].codebook.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Invariants of the tokenizer (MedITok-Tiny on CPU)
# ----------------------------------------------------------------------------------------------
def test_tiny_is_small():
    with torch.device("meta"):
        model = MedITok(MEDITOK_CONFIGS[TINY], 64)
    assert sum(p.numel() for p in model.parameters()) <= 5_000_000


def test_round_trip_equals_reconstruction(tiny):
    x = images(tiny)
    with torch.no_grad():
        idx = tiny.img_to_idx(x)
        assert torch.equal(tiny.idx_to_img(idx), tiny.img_to_reconstructed_img(x))


def test_indices_shapes_and_range(tiny):
    cfg, x = tiny.config, images(tiny, n=3)
    with torch.no_grad():
        idx = tiny.img_to_idx(x)
        h = tiny.grid_size
        assert idx.dtype == torch.long and idx.shape == (3, cfg.num_codebooks, h * h)
        assert 0 <= idx.min() and idx.max() < cfg.vocab_size // cfg.num_codebooks
        # [B, K, h, w] decodes like [B, K, L]
        assert torch.equal(tiny.idx_to_img(idx.view(3, cfg.num_codebooks, h, h)), tiny.idx_to_img(idx))
        img = tiny.idx_to_img(idx)
        assert img.shape == x.shape and img.min() >= -1 and img.max() <= 1


def test_latents_invert_to_indices(tiny):
    x = images(tiny)
    with torch.no_grad():
        idx = tiny.img_to_idx(x)
        lat = tiny.encode_image_vq(x)  # [B, L, vocab_width]
        assert lat.shape == (2, tiny.grid_size ** 2, tiny.vocab_width)
        # each chunk is a unit code vector
        chunks = lat.view(2, -1, tiny.num_codebooks, tiny.vocab_width // tiny.num_codebooks)
        assert torch.allclose(chunks.norm(dim=-1), torch.ones(()), atol=1e-5)
        grid = lat.transpose(1, 2).reshape(2, tiny.vocab_width, tiny.grid_size, tiny.grid_size)
        assert torch.equal(tiny.latent_to_idx(grid), idx)


def test_alignment_features(tiny):
    x = images(tiny)
    with torch.no_grad():
        e = tiny.encode_image(x, normalize=True)
        assert e.shape == (2, tiny.config.embed_dim)
        assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(F.normalize(tiny.encode_image(x), dim=-1), e, atol=1e-6)
        assert tiny.forward_features(x).shape == (2, tiny.config.width)


def test_other_image_sizes(tiny):
    d = tiny.config.downsample
    x = images(tiny, side=d * 3)
    with torch.no_grad():
        idx = tiny.img_to_idx(x)
        assert idx.shape[-1] == 9
        assert tiny.idx_to_img(idx).shape == x.shape
        with pytest.raises(ValueError, match="multiple"):
            tiny.img_to_reconstructed_img(images(tiny, side=d * 3 + 1))


def test_training_forward_backward_and_usage(tiny):
    model = build_meditok(model_name=TINY, img_size=tiny.img_size, use_entropy_loss=True).train()
    x = images(model, n=4)
    out = model(x)
    K = model.num_codebooks
    assert out["rec"].shape == x.shape and out["idx"].shape == (4, K, model.grid_size ** 2)
    assert out["usage"].shape == (K,) and ((out["usage"] > 0) & (out["usage"] <= 1)).all()
    assert torch.isfinite(out["entropy_loss"]) and out["vq_loss"] > 0
    (F.mse_loss(out["rec"], x) + out["vq_loss"] + 0.1 * out["entropy_loss"]).backward()
    # straight-through: the reconstruction loss reaches the encoder; the VQ loss reaches the codebooks
    assert model.encoder.patch_embed.backbone.stem.conv1.weight.grad.abs().sum() > 0
    assert model.quantizer.codebooks[0].codebook.weight.grad.abs().sum() > 0
    assert not model.encoder.pos_embed.requires_grad
    # the usage buffer records training batches (a distribution over codes) and not evaluation ones
    usage = model.quantizer.codebooks[0].vocab_usage.clone()
    assert torch.isclose(usage.sum(), torch.tensor(1.0))
    with torch.no_grad():
        model.eval()(images(model, seed=1))
    assert torch.equal(model.quantizer.codebooks[0].vocab_usage, usage)


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
def same_outputs(a, b, x):
    with torch.no_grad():
        return torch.equal(a.img_to_idx(x), b.img_to_idx(x)) and torch.equal(
            a.img_to_reconstructed_img(x), b.img_to_reconstructed_img(x))


def test_save_and_rebuild_from_path_alone(tiny, tmp_path):
    path = tmp_path / "tok.pt"
    save_meditok(tiny, path, extra={"step": 7})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == "meditok" and ckpt["img_size"] == tiny.img_size and ckpt["step"] == 7
    model = build_meditok(path)
    assert model.config == tiny.config and model.img_size == tiny.img_size and not model.training
    assert same_outputs(model, tiny, images(tiny))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def perturbed(model):
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def same_weights(model, state_dict):
    ours = model.state_dict()
    return ours.keys() == state_dict.keys() and all(torch.equal(ours[k], v) for k, v in state_dict.items())


def test_plain_wrapped_and_safetensors(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = tiny.state_dict()
    atomic_save(sd, tmp_path / "plain.pth")  # like the released file: no config, config inferred
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    atomic_save({"state_dict": sd}, tmp_path / "wrapped.pt")
    for name in ("plain.pth", "w.safetensors", "wrapped.pt"):
        model = build_meditok(tmp_path / name, img_size=tiny.img_size)
        assert model.config == tiny.config, name
        assert same_weights(model, sd), name
    # EMA weights win unless asked otherwise
    ema = perturbed(tiny)
    atomic_save({"model": sd, "ema": ema, "config": asdict(tiny.config)}, tmp_path / "ema.pt")
    assert same_weights(build_meditok(tmp_path / "ema.pt", img_size=tiny.img_size), ema)
    assert same_weights(build_meditok(tmp_path / "ema.pt", img_size=tiny.img_size, prefer_ema=False), sd)


def test_infer_config_of_unregistered_shapes():
    cfg = replace(MEDITOK_CONFIGS[TINY], depth=2, decoder_depth=3, conv_depths=(2, 1), decoder_widths=(48, 24),
                  vocab_size=2048, num_codebooks=4, embed_dim=64)
    with torch.device("meta"):
        model = MedITok(cfg, 32)
    assert infer_config(model.state_dict()) == cfg


def test_mismatch_names_keys_and_config(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["decoder.extra.weight"] = sd.pop("decoder.up_conv4.conv2.weight")
    atomic_save({"model": sd, "config": asdict(tiny.config)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        build_meditok(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "decoder.up_conv4.conv2.weight" in msg and "decoder.extra.weight" in msg
    assert "bad.pt" in msg and "stored in the checkpoint" in msg and f"width={tiny.config.width}" in msg
    # weights read as a registered config they do not fit: the message names that config
    atomic_save(tiny.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="registered config MedITok-B"):
        build_meditok(tmp_path / "plain.pt", model_name="MedITok-B")


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    # e.g. training args pickled into a checkpoint: refused, never unpickled
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        build_meditok(path)


# ----------------------------------------------------------------------------------------------
# A short real training run on medical images
# ----------------------------------------------------------------------------------------------
def mni_slices(side):
    """Axial slices of the MNI152 template (ships with nilearn; no download), as [N, 3, side, side] in [-1, 1]."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    vol /= vol.max()
    keep = [z for z in range(vol.shape[2]) if (vol[:, :, z] > 0.1).mean() > 0.1]
    x = torch.from_numpy(np.stack([np.rot90(vol[:, :, z]).copy() for z in keep]))[:, None]  # [N, 1, H, W]
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    return x.repeat(1, 3, 1, 1) * 2 - 1


@pytest.mark.slow
def test_tiny_learns_to_reconstruct_mni_slices():
    torch.manual_seed(0)
    cfg = MEDITOK_CONFIGS[TINY]
    side = cfg.downsample * 4
    x = mni_slices(side)
    held_out = x[::6]  # every 6th slice is only evaluated
    train = x[[i for i in range(len(x)) if i % 6]]
    model = build_meditok(model_name=TINY, img_size=side).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def eval_mse():
        with torch.no_grad():
            return F.mse_loss(model.eval().img_to_reconstructed_img(held_out), held_out).item()

    before = eval_mse()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = train[torch.randint(len(train), (8,), generator=g)]
        out = model.train()(batch)
        loss = F.mse_loss(out["rec"], batch) + out["vq_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_mse()
    print(f"held-out MSE {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before, (before, after)
