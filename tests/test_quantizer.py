"""models/quantizer.py: defaults, argument checks and the training-mode output, each against a value
written out here (the cases mutation testing found unguarded; see scripts/mutation.sh)."""
import pytest
import torch
import torch.nn.functional as F

from models.quantizer import MultiCodebookQuantizer, entropy_loss


def test_entropy_loss_with_unnormalised_codebook_uses_squared_distances():
    # The formula is softmax(-||f - e||^2 / T); codes of different norms make the ||e||^2 term matter.
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 3, generator=g)
    e = torch.randn(5, 3, generator=g) * torch.arange(1, 6).view(5, 1)
    log_p = torch.log_softmax(-torch.cdist(f, e) ** 2 / 0.7, dim=1)
    p = log_p.exp()
    avg = p.mean(0)
    expected = -(p * log_p).sum(1).mean() + (avg * avg.log()).sum()
    torch.testing.assert_close(entropy_loss(f, e, 0.7), expected, rtol=1e-4, atol=1e-6)


def test_defaults_beta_entropy_and_temperature():
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(vocab_size=32, vocab_width=8, num_codebooks=2).train()
    f = torch.randn(2, 3, 8)
    out, vq_loss, ent, _, idx = q(f)
    fn = torch.cat([F.normalize(c, dim=-1) for c in f.split(4, -1)], -1)
    # beta 0.25: beta * mse(sg(q), f) + mse(q, sg(f)) has the value 1.25 * mse, averaged over codebooks
    per_cb = [(o - c).square().mean() for o, c in zip(q.idx_to_f(idx).split(4, -1), fn.split(4, -1))]
    torch.testing.assert_close(vq_loss, 1.25 * sum(per_cb) / 2)
    assert ent.item() == 0.0  # the entropy loss is off by default
    q.use_entropy_loss = True
    ent = q(f)[2]
    expected = sum(entropy_loss(c.reshape(-1, 4), cb.normalized_weight(), 0.01)  # temperature 0.01
                   for c, cb in zip(fn.split(4, -1), q.codebooks)) / 2
    torch.testing.assert_close(ent, expected)


def test_training_output_has_the_code_values():
    """Straight-through changes the gradient only: in training mode the output still equals the codes."""
    torch.manual_seed(0)
    q = MultiCodebookQuantizer(vocab_size=64, vocab_width=16, num_codebooks=4).train()
    f = torch.randn(2, 5, 16, requires_grad=True)
    out, *_, idx = q(f)
    torch.testing.assert_close(out.detach(), q.idx_to_f(idx), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab_size, vocab_width", [(30, 16), (32, 10)])
def test_sizes_must_divide_by_the_codebook_count(vocab_size, vocab_width):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size} and vocab_width={vocab_width}.*num_codebooks=4"):
        MultiCodebookQuantizer(vocab_size=vocab_size, vocab_width=vocab_width, num_codebooks=4)


def test_idx_to_f_rejects_wrong_shapes():
    q = MultiCodebookQuantizer(vocab_size=64, vocab_width=16, num_codebooks=4)
    for bad in (torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"indices must be \[B, 4, L\].*got " + str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
            q.idx_to_f(bad)
