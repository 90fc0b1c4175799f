"""KV-cache sampling with guidance: parity with the released sampler and invariants."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_state_dict_strict
import models.generate as generate_module
from models.generate import PackedLinear, can_prepack, generate, generate_naive, guidance_scales, sample_logits
from models.gpt import ModelArgs, Transformer
# test_gpt by its basename: pytest puts tests/ on sys.path, and `tests` itself is taken by torch-fidelity
from test_gpt import one_thread, randomize, tiny_args  # noqa: F401 (one_thread: autouse fixture)

REFERENCE = Path(__file__).parent / "data" / "gpt_c2i_tiny_reference.pt"


@pytest.fixture(scope="module")
def reference():
    ref = torch.load(REFERENCE, weights_only=True)
    model = load_state_dict_strict(Transformer(ModelArgs(**ref["config"])), ref["state_dict"])
    return ref, model.eval()


@pytest.mark.parametrize("cfg", [1, 3])
def test_reference_greedy_codes(reference, cfg):
    ref, model = reference
    labels = ref["labels"].long()
    expected = ref[f"greedy_codes_cfg{cfg}"].long()
    codes = generate(model, labels, expected.shape[-1], cfg_scale=float(cfg), sample_logits=False)
    assert codes.shape == expected.shape and codes.dtype == torch.long
    assert torch.equal(codes, expected)


def test_reference_greedy_codes_uncached(reference):
    ref, model = reference
    codes = generate_naive(model, ref["labels"].long(), 16, cfg_scale=3.0, sample_logits=False)
    assert torch.equal(codes, ref["greedy_codes_cfg3"].long())


VARIANTS = {
    "base": dict(),
    "grouped-query, 3 condition slots, 2 head layers": dict(n_kv_head=2, cls_token_num=3, n_output_layer=2),
    "2 codebooks, 6x6 grid": dict(num_codebooks=2, vocab_size=64, block_size=36),
    "1 codebook": dict(num_codebooks=1, vocab_size=32),
}
GUIDANCE = {
    "none": dict(cfg_scale=1.0),
    "constant": dict(cfg_scale=3.0),
    "linear": dict(cfg_scale=2.0, cfg_schedule="linear"),
    "interval": dict(cfg_scale=4.0, cfg_interval=3),
}


@pytest.mark.parametrize("variant, guidance", [
    ("base", "none"), ("base", "constant"), ("base", "linear"), ("base", "interval"),
    ("grouped-query, 3 condition slots, 2 head layers", "constant"),
    ("2 codebooks, 6x6 grid", "interval"),
    ("1 codebook", "constant"),
])
def test_cached_greedy_equals_uncached_argmax(variant, guidance):
    model = randomize(Transformer(tiny_args(**VARIANTS[variant]))).eval()
    labels = torch.tensor([0, 2, 1, 0])
    L = model.block_size
    cached = generate(model, labels, L, sample_logits=False, **GUIDANCE[guidance])
    naive = generate_naive(model, labels, L, sample_logits=False, **GUIDANCE[guidance])
    assert cached.shape == (4, model.num_codebooks, L)
    assert torch.equal(cached, naive)


def test_uncached_argmax_matches_teacher_forced_argmax():
    """The naive sampler's greedy codes are the fixed point of teacher forcing: feeding them back gives
    logits whose argmax is the codes themselves (checks the sampler's slot bookkeeping independently)."""
    model = randomize(Transformer(tiny_args())).eval()
    labels = torch.tensor([1, 2])
    codes = generate_naive(model, labels, model.block_size, sample_logits=False)
    logits, _ = model(codes[:, :, :-1], labels, targets=codes)
    assert torch.equal(logits.argmax(-1), codes)


def test_top_k_1_equals_greedy():
    model = randomize(Transformer(tiny_args())).eval()
    labels = torch.tensor([0, 1, 2])
    greedy = generate(model, labels, 10, cfg_scale=2.0, sample_logits=False)
    g = torch.Generator().manual_seed(0)
    top1 = generate(model, labels, 10, cfg_scale=2.0, top_k=1, temperature=1.7, generator=g)
    assert torch.equal(top1, greedy)


def test_sampling_is_reproducible_with_a_generator_and_varies_with_the_seed():
    model = randomize(Transformer(tiny_args())).eval()
    labels = torch.tensor([0, 1])

    def run(seed, **kw):
        return generate(model, labels, 12, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(5, top_k=4, top_p=0.8), run(5, top_k=4, top_p=0.8))


def test_cached_sampling_equals_uncached_sampling_with_the_same_seed():
    # Both draw one uniform per head step in the same order, so equal logits give equal samples.
    model = randomize(Transformer(tiny_args()), std=0.1).eval()
    labels = torch.tensor([0, 1, 2])
    kw = dict(cfg_scale=2.0, top_k=20, top_p=0.9, temperature=1.3)
    cached = generate(model, labels, 16, generator=torch.Generator().manual_seed(3), **kw)
    naive = generate_naive(model, labels, 16, generator=torch.Generator().manual_seed(3), **kw)
    assert (cached == naive).float().mean() > 0.95  # float round-off may flip a rare near-tie


def test_sample_logits_filters():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    g = torch.Generator().manual_seed(0)
    top3 = logits.topk(3, dim=-1).indices
    drawn = sample_logits(logits, top_k=3, generator=g)
    assert (drawn[:, None] == top3).any(-1).all()
    # top-p small enough to keep only the most likely token
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=g), logits.argmax(-1))
    # the token that crosses top_p is kept: with two equal tokens and top_p=0.5 both can appear
    two = torch.tensor([[5.0, 5.0, -30.0]]).repeat(2000, 1)
    drawn = sample_logits(two, top_p=0.5, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    # plain sampling follows the softmax: frequencies within a few standard errors
    probs = torch.tensor([0.6, 0.3, 0.1])
    drawn = sample_logits(probs.log().repeat(20000, 1), generator=g)
    freq = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    assert (freq - probs).abs().max() < 0.02
    assert torch.equal(sample_logits(logits, sample=False), logits.argmax(-1))


def reference_scales(cfg_scale, n, cfg_interval=-1, cfg_schedule="constant"):
    """Independent statement of the schedules. Interval: the released sampler (MedITok / LlamaGen
    generate.py) always guides the prefill (image position 0); its decoding step i (image position i + 1)
    drops guidance once cfg_interval > -1 and i > cfg_interval. Linear: a ramp (Muse / MAR style) that,
    as documented here, goes from 1 at the first image position to cfg_scale at the last."""
    ramp = np.linspace(1.0, cfg_scale, n) if cfg_schedule == "linear" else np.full(n, cfg_scale)
    guided = [True] + [not (cfg_interval > -1 and i > cfg_interval) for i in range(n - 1)]
    return [float(s) if g else None for s, g in zip(ramp, guided)]


@pytest.mark.parametrize("cfg_scale, n, cfg_interval, cfg_schedule", [
    (3.0, 4, -1, "constant"), (1.0, 3, -1, "constant"), (2.5, 7, -1, "linear"), (4.0, 2, -1, "linear"),
    (2.0, 1, -1, "linear"), (2.0, 6, 0, "constant"), (2.0, 6, 1, "constant"), (3.0, 9, 3, "linear"),
    (2.0, 5, 10, "constant"), (1.5, 256, 20, "linear"),
])
def test_guidance_scales_match_the_reference_rule(cfg_scale, n, cfg_interval, cfg_schedule):
    expected = reference_scales(cfg_scale, n, cfg_interval, cfg_schedule)
    got = guidance_scales(cfg_scale, n, cfg_interval, cfg_schedule)
    assert [s is None for s in got] == [s is None for s in expected]
    assert [s for s in got if s is not None] == pytest.approx([s for s in expected if s is not None], rel=1e-12)


def test_guidance_scales_rejects_unknown_schedules():
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_scales(2.0, 3, cfg_schedule="cosine")


GUIDED = {
    "constant": dict(cfg_scale=3.0),
    "linear": dict(cfg_scale=4.0, cfg_schedule="linear"),
    "interval 0": dict(cfg_scale=4.0, cfg_interval=0),
    "interval 3, linear": dict(cfg_scale=5.0, cfg_interval=3, cfg_schedule="linear"),
}


@pytest.mark.parametrize("name", list(GUIDED))
def test_guided_greedy_codes_are_the_fixed_point_of_guided_teacher_forcing(name):
    """Guidance computed outside the sampler: teacher-forced logits for the labels and for the null class,
    mixed at each position with the reference scale, have the sampled codes as their argmax."""
    kw = GUIDED[name]
    model = randomize(Transformer(tiny_args())).eval()
    labels = torch.tensor([0, 2, 1])
    L = model.block_size
    codes = generate(model, labels, L, sample_logits=False, **kw)
    null = torch.full_like(labels, model.config.num_classes)  # the label table's last row
    with torch.no_grad():
        cond, _ = model(codes[:, :, :-1], labels, targets=codes)  # [B, K, L, V]
        uncond, _ = model(codes[:, :, :-1], null, targets=codes)
    scales = reference_scales(kw["cfg_scale"], L, kw.get("cfg_interval", -1), kw.get("cfg_schedule", "constant"))
    guided = torch.stack([cond[:, :, t] if s is None else uncond[:, :, t] + (cond[:, :, t] - uncond[:, :, t]) * s
                          for t, s in enumerate(scales)], dim=2)
    assert torch.equal(guided.argmax(-1), codes)
    # and the schedule matters here: plain constant guidance gives other codes
    if name != "constant":
        assert not torch.equal(codes, generate(model, labels, L, cfg_scale=kw["cfg_scale"], sample_logits=False))


def test_generate_restores_the_model_state():
    model = randomize(Transformer(tiny_args()))
    model.train()
    keys = list(model.state_dict())
    generate(model, torch.tensor([0]), 5, cfg_scale=2.0)
    assert model.training and list(model.state_dict()) == keys
    assert all(layer.attention.kv_cache is None for layer in model.layers)


needs_onednn = pytest.mark.skipif(not can_prepack(Transformer(tiny_args())), reason="torch build without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    for shape in [(8, 96), (3, 1, 96), (2, 5, 96)]:
        x = torch.randn(shape)
        expected = linear(x)
        got = packed(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("kw", [dict(sample_logits=False), dict(top_k=20, temperature=1.3)])
def test_prepacked_sampling_gives_the_same_codes(kw):
    model = randomize(Transformer(tiny_args(n_output_layer=2)), std=0.1).eval()
    labels = torch.tensor([0, 2, 1])

    def run(prepack):
        return generate(model, labels, model.block_size, cfg_scale=3.0, prepack=prepack,
                        generator=torch.Generator().manual_seed(7), **kw)

    assert torch.equal(run(True), run(False))


@needs_onednn
def test_prepacking_is_undone_after_generate_and_on_error(monkeypatch):
    model = randomize(Transformer(tiny_args()))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    generate(model, torch.tensor([0]), 4, cfg_scale=2.0, prepack=True)

    def boom(*args, **kwargs):
        assert isinstance(model.output.linear_head, PackedLinear)  # swapped while sampling
        raise RuntimeError("boom")

    monkeypatch.setattr(generate_module, "decode_head", boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, torch.tensor([0]), 4, prepack=True)
    assert {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="prepack"):
        generate(model.double(), torch.tensor([0]), 4, prepack=True)


def test_fixed_shape_decoding_equals_prefix_decoding(monkeypatch):
    """compile=True decodes with fixed shapes (attention over the whole masked cache); eager decoding
    attends to the filled prefix only. Same codes; torch.compile itself is replaced by the identity."""
    model = randomize(Transformer(tiny_args(cls_token_num=2)), std=0.1).eval()
    labels = torch.tensor([1, 0])
    eager = generate(model, labels, model.block_size, cfg_scale=2.0, sample_logits=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    fixed = generate(model, labels, model.block_size, cfg_scale=2.0, sample_logits=False, compile=True)
    assert torch.equal(eager, fixed)


def test_generate_argument_errors():
    model = Transformer(tiny_args())
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([0]), model.block_size + 1)
    with pytest.raises(ValueError, match="1-D"):
        generate(model, torch.tensor([[0]]), 4)
    with pytest.raises(ValueError, match="null class"):
        generate(Transformer(tiny_args(class_dropout_prob=0.0)), torch.tensor([0]), 4, cfg_scale=2.0)


def test_sampling_draws_one_uniform_per_row_and_reaches_every_index():
    """Each row consumes exactly one uniform from the generator (the documented draw: one uniform per
    row, inverted through the CDF), and a code beyond the batch size is drawn when it holds the mass."""
    logits = torch.full((4, 50), -30.0)
    logits[:, 40] = 30.0
    logits[1, 41] = 30.0  # row 1: two equally likely codes
    for kw in (dict(), dict(temperature=0.7), dict(top_k=10), dict(top_p=0.6)):
        g = torch.Generator().manual_seed(5)
        drawn = sample_logits(logits, generator=g, **kw).tolist()
        assert drawn[0] == drawn[2] == drawn[3] == 40 and drawn[1] in (40, 41), (kw, drawn)
        ref = torch.Generator().manual_seed(5)
        torch.rand(4, 1, generator=ref)
        assert torch.equal(g.get_state(), ref.get_state()), kw


@pytest.mark.parametrize("sampler", [generate, generate_naive])
def test_default_settings_are_plain_sampling(sampler):
    """Defaults: no guidance, temperature 1, no top-k / top-p filtering."""
    model = randomize(Transformer(tiny_args()), std=0.1).eval()
    labels = torch.tensor([0, 2])

    def run(**kw):
        return sampler(model, labels, 6, generator=torch.Generator().manual_seed(1), **kw)

    assert torch.equal(run(), run(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0))
