"""models/generate.py, text-to-image branches: the argument contracts that mutation testing
(scripts/mutation.sh) found unchecked, with the exact shapes each message must name."""
from __future__ import annotations

import pytest
import torch

from models.generate import generate, generate_naive
from models.gpt import Transformer
from test_gpt import one_thread, randomize, tiny_args  # noqa: F401 (by basename: torch-fidelity ships a top-level `tests`)
from test_t2i import model_and_caption


@pytest.mark.parametrize("sampler", [generate, generate_naive])
def test_t2i_argument_errors_name_the_shapes(sampler):
    model, cond, mask = model_and_caption(False)  # features [3, 5, 24], mask [3, 5]
    cases = [
        (cond[:, :, 0], {}, "cond must be caption features [B, T, caption_dim] with T = cls_token_num = 5, got shape (3, 5)"),
        (cond[:, 1:], {}, "cond must be caption features [B, T, caption_dim] with T = cls_token_num = 5, got shape (3, 4, 24)"),
        (cond, dict(cond_mask=mask[:, 1:]), "cond_mask (3, 4) must be [B, T] = (3, 5)"),
        (cond, dict(cond_mask=mask[:2]), "cond_mask (2, 5) must be [B, T] = (3, 5)"),
        (cond, dict(max_new_tokens=0), "max_new_tokens=0 must be in [1, block_size=16]"),
    ]
    for c, kw, message in cases:
        kw = {"max_new_tokens": model.block_size, **kw}
        with pytest.raises(ValueError) as err:
            sampler(model, c, cond_mask=kw.pop("cond_mask", None), **kw)
        assert str(err.value) == message  # whole messages: a wrapped or truncated text fails
    builtin, ids, ids_mask = model_and_caption(True)  # word ids [3, 5]
    with pytest.raises(ValueError, match=r"cond must be word ids \[B, T\] with T = cls_token_num = 5, got shape \(3, 5, 24\)"):
        sampler(builtin, cond, 4)
    with pytest.raises(ValueError, match=r"got shape \(3, 4\)"):
        sampler(builtin, ids[:, 1:], 4)
    c2i = Transformer(tiny_args())
    with pytest.raises(ValueError) as err:
        sampler(c2i, torch.tensor([0, 1]), 4, cond_mask=torch.ones(2, 1, dtype=torch.bool))
    assert str(err.value) == "cond_mask is for text-to-image models; this one is class-conditional"
    with pytest.raises(ValueError) as err:
        sampler(c2i, torch.tensor([[0, 1]]), 4)
    assert str(err.value) == "cond must be a 1-D tensor of class labels, got shape (1, 2)"


def test_t2i_edge_lengths_and_integer_masks():
    model, cond, mask = model_and_caption(False, seed=1)
    assert generate(model, cond, 1, sample_logits=False, cond_mask=mask).shape == (3, 4, 1)
    full = generate(model, cond, model.block_size, cfg_scale=2.0, sample_logits=False, cond_mask=mask)
    # A 0/1 integer mask means the same as the boolean one.
    assert torch.equal(generate(model, cond, model.block_size, cfg_scale=2.0, sample_logits=False,
                                cond_mask=mask.long()), full)


@pytest.mark.parametrize("sampler", [generate, generate_naive])
def test_no_guidance_needs_no_null_class(sampler):
    model = randomize(Transformer(tiny_args(class_dropout_prob=0.0))).eval()  # no null row in the label table
    assert sampler(model, torch.tensor([0, 2]), 4, cfg_scale=1.0, sample_logits=False).shape == (2, 4, 4)
    with pytest.raises(ValueError) as err:
        sampler(model, torch.tensor([0]), 4, cfg_scale=1.5)
    assert str(err.value) == "guidance needs the null class: this model was built with class_dropout_prob = 0"


def test_draw_on_a_cdf_boundary_takes_the_next_code():
    """The draw is the right-continuous inverse of the CDF: index i with cdf[i-1] <= u < cdf[i]. A uniform
    that lands exactly on a boundary (made so here: the first code's mass is the seeded uniform itself)
    goes past the zero-probability code after it, to the next code with mass."""
    from models.generate import _draw
    for seed in range(5):
        r = torch.rand(1, 1, generator=torch.Generator().manual_seed(seed))  # the uniform _draw will draw
        probs = torch.cat([r, torch.zeros(1, 1), 1 - r], dim=1)  # cdf [r, r, 1]: u = r * 1 = r exactly
        assert probs.sum().item() == 1.0
        assert _draw(probs, torch.Generator().manual_seed(seed)).item() == 2


def reference_sample(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """The documented draw written out in float64, one row at a time: temperature, then top-k (the
    candidates in descending order), then top-p (a candidate stays while the mass before it is <= top_p),
    then the right-continuous inverse CDF of the kept mass at the row's uniform u. Without filtering the
    CDF runs over the vocabulary in index order."""
    out = []
    for row, ur in zip(logits.double(), u[:, 0].double()):
        x = row / max(temperature, 1e-5)
        V = x.numel()
        if 0 < top_k < V or top_p < 1.0:
            order = torch.argsort(x, descending=True)[: top_k if 0 < top_k < V else V]
        else:
            order = torch.arange(V)
        p = torch.softmax(x[order], dim=0)
        if top_p < 1.0:
            p = p * ((torch.cumsum(p, 0) - p) <= top_p)
        cdf = torch.cumsum(p, 0)
        out.append(int(order[int((cdf <= ur * cdf[-1]).sum())]))
    return torch.tensor(out)


@pytest.mark.parametrize("kw", [
    dict(), dict(temperature=2.0), dict(temperature=0.5), dict(top_k=5), dict(top_k=5, temperature=2.0),
    dict(top_p=0.7), dict(top_p=1.0), dict(top_k=12, top_p=0.5), dict(top_k=40), dict(top_k=43),
])
def test_sample_logits_is_the_written_out_draw(kw):
    """Each setting gives the index the written-out draw gives for the generator's uniforms (so a top-k of
    the whole vocabulary, or top-p 1, is plain sampling: the same index from the same uniform)."""
    from models.generate import sample_logits
    logits = torch.randn(300, 40, generator=torch.Generator().manual_seed(0)) * 2
    u = torch.rand(300, 1, generator=torch.Generator().manual_seed(1))
    got = sample_logits(logits, generator=torch.Generator().manual_seed(1), **kw)
    assert got.dtype == torch.long
    assert (got == reference_sample(logits, u, **kw)).float().mean() >= 0.99  # float32 vs float64 at a boundary


def test_temperature_zero_is_greedy():
    from models.generate import sample_logits
    logits = torch.randn(200, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, temperature=0.0, generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1))


def test_cache_reads_cover_the_filled_slots_eager_and_the_whole_cache_compiled(monkeypatch):
    """Eager decoding attends over exactly the filled slots: the prefill reads the T condition slots, the step
    that writes slot s reads s + 1. With compile=True the decoding steps read the whole fixed-size cache
    (kv_len None) and the linear layers are not prepacked (torch.compile traces plain nn.Linear)."""
    from models.generate import PackedLinear
    model = randomize(Transformer(tiny_args(cls_token_num=2)), std=0.1).eval()
    calls, packed = [], []
    real = model.step

    def spy(x, input_pos, kv_len=None):
        calls.append((input_pos.tolist(), kv_len))
        packed.append(isinstance(model.output.linear_head, PackedLinear))
        return real(x, input_pos, kv_len)

    sizes = []
    real_setup = model.setup_caches
    monkeypatch.setattr(model, "setup_caches", lambda B, S, **kw: sizes.append((B, S)) or real_setup(B, S, **kw))
    monkeypatch.setattr(model, "step", spy)
    eager = generate(model, torch.tensor([1, 0]), 5, cfg_scale=2.0, sample_logits=False)
    assert calls == [([0, 1], 2), ([2], 3), ([3], 4), ([4], 5), ([5], 6)] and all(packed)
    assert sizes == [(4, 2 + 5 - 1)]  # doubled batch; T + L - 1 slots (the last codes are never fed back)
    calls.clear(), packed.clear()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    fixed = generate(model, torch.tensor([1, 0]), 5, cfg_scale=2.0, sample_logits=False, compile=True)
    assert calls == [([0, 1], 2), ([2], None), ([3], None), ([4], None), ([5], None)] and not any(packed)
    assert torch.equal(eager, fixed)
    assert not fixed.is_inference() and fixed.requires_grad is False  # a normal tensor, usable outside inference mode


def test_low_precision_logits_are_sampled_in_float32():
    """bf16 logits (a bf16 model) are filtered and drawn in float32: the same codes as their float32 copy."""
    from models.generate import sample_logits
    logits = (torch.randn(400, 300, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    for kw in (dict(), dict(top_k=50, top_p=0.9)):
        a = sample_logits(logits, generator=torch.Generator().manual_seed(2), **kw)
        b = sample_logits(logits.float(), generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, b), kw


def test_setting_errors_are_whole_messages(monkeypatch):
    from models.generate import guidance_scales
    with pytest.raises(ValueError) as err:
        guidance_scales(2.0, 3, cfg_schedule="cosine")
    assert str(err.value) == "cfg_schedule='cosine'; choose from ('constant', 'linear')"
    assert guidance_scales(2.0, 4) == [2.0] * 4  # defaults: constant, at every position
    model = Transformer(tiny_args()).double()
    with pytest.raises(ValueError) as err:
        generate(model, torch.tensor([0]), 4, prepack=True)
    assert str(err.value) == "prepack=True needs a float32 model on the CPU and a torch build with oneDNN"
    seen, steps = [], []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return lambda *a, **kw: steps.append(1) or fn(*a, **kw)

    monkeypatch.setattr(torch, "compile", fake_compile)
    generate(model.float(), torch.tensor([0]), 4, compile=True)
    assert seen == [dict(dynamic=False)]  # one compilation for every step: the shapes never change
    assert len(steps) == 3  # and the compiled step decodes positions 1..L-1
