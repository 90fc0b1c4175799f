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
