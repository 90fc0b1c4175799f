"""The tokenizer's loss terms against independent formulas, and every loss / augmentation option of
scripts/train_tokenizer.py shown to change the training gradient (an option that did nothing fails).

- entropy loss and VQ loss: models/quantizer.py against the formulas written out here;
- perceptual loss: models/losses.py against torchvision's VGG16 run directly (random weights: nothing is
  downloaded);
- trainer options: a spy on the gradient-clipping call of train_tokenizer's first step records every
  parameter's gradient; a run with the option differs from the baseline, and two baseline runs agree.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.metadata import write_metadata
from models.losses import VGG16_TAPS, PerceptualLoss
from models.quantizer import MultiCodebookQuantizer, entropy_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# Entropy loss and VQ loss
# ----------------------------------------------------------------------------------------------
def reference_entropy_loss(f, e, T):
    """mean_i H(p_i) - H(mean_i p_i), p_i = softmax_j(-||f_i - e_j||^2 / T)."""
    d = torch.cdist(f.double(), e.double()) ** 2  # [N, V]
    p = torch.softmax(-d / T, dim=1)
    per_sample = -(p * torch.log(p)).sum(1).mean()
    avg = p.mean(0)
    return per_sample - (-(avg * torch.log(avg)).sum())


def test_entropy_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    e = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    for T in (0.5, 0.1):  # soft enough that every probability is representable in float32
        torch.testing.assert_close(entropy_loss(f, e, T).double(), reference_entropy_loss(f, e, T), rtol=1e-4,
                                   atol=1e-5)


def test_entropy_loss_known_values():
    e = torch.eye(4)  # 4 orthonormal codes
    # confident picks spread evenly over all codes: per-sample entropy 0, codebook entropy log 4
    assert entropy_loss(e.repeat(3, 1), e, 0.01).item() == pytest.approx(-math.log(4), abs=1e-4)
    # confident picks all of one code: both entropies 0
    assert entropy_loss(e[:1].repeat(5, 1), e, 0.01).item() == pytest.approx(0.0, abs=1e-4)
    # a feature equidistant from all codes: per-sample entropy log 4, codebook entropy log 4
    assert entropy_loss(torch.zeros(3, 4), e, 0.01).item() == pytest.approx(0.0, abs=1e-4)


def quantizer(seed=0, **kw):
    torch.manual_seed(seed)
    return MultiCodebookQuantizer(vocab_size=64, vocab_width=16, num_codebooks=4, **kw)


def test_vq_loss_and_entropy_loss_of_the_quantizer_match_formulas():
    q = quantizer(beta=0.3, use_entropy_loss=True, entropy_temp=0.2).train()
    f = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out, vq_loss, ent, usage, idx = q(f)
    vq_ref, ent_ref = 0.0, 0.0
    for k, (cb, chunk) in enumerate(zip(q.codebooks, f.detach().split(4, dim=-1))):
        fn = F.normalize(chunk, dim=-1)
        e = F.normalize(cb.codebook.weight.detach(), dim=-1)
        code = (fn @ e.T).argmax(-1)  # cosine similarity
        assert torch.equal(idx[:, k], code)
        vq_ref += (1 + 0.3) * (e[code] - fn).square().mean()  # beta * commitment + codebook term (same value)
        ent_ref += reference_entropy_loss(fn.reshape(-1, 4), e, 0.2)
    torch.testing.assert_close(vq_loss.double(), (vq_ref / 4).double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ent.double(), ent_ref / 4, rtol=1e-4, atol=1e-6)
    assert usage.shape == (4,)


def test_vq_loss_gradients_split_by_beta():
    """d vq / d codebook comes from mse(q, sg(f)) alone; d vq / d f from beta * mse(sg(q), f) alone:
    doubling beta doubles the feature gradient and leaves the codebook gradient."""
    f = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    grads = {}
    for beta in (0.25, 0.5):
        q = quantizer(beta=beta).train()
        x = f.clone().requires_grad_(True)
        _, vq_loss, *_ = q(x)
        vq_loss.backward()
        grads[beta] = (x.grad.clone(), q.codebooks[0].codebook.weight.grad.clone())
    torch.testing.assert_close(grads[0.5][0], 2 * grads[0.25][0])
    torch.testing.assert_close(grads[0.5][1], grads[0.25][1])
    assert grads[0.25][0].abs().sum() > 0 and grads[0.25][1].abs().sum() > 0


def test_straight_through_passes_the_gradient_to_the_features_unchanged():
    """Training mode: the quantized output carries the gradient of the normalised features, as if it were
    those features; evaluation mode returns the code vectors themselves."""
    q = quantizer().train()
    f = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(4))
    out, *_ = q(f)
    (out * w).sum().backward()
    f2 = f.detach().clone().requires_grad_(True)
    fn = torch.cat([F.normalize(c, dim=-1) for c in f2.split(4, dim=-1)], -1)
    (fn * w).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(f)[0], q.idx_to_f(q.f_to_idx(f)))


def test_entropy_loss_is_zero_and_gradient_free_when_off():
    q = quantizer(use_entropy_loss=False).train()
    f = torch.randn(2, 3, 16, requires_grad=True)
    _, _, ent, *_ = q(f)
    assert ent.item() == 0.0 and not ent.requires_grad


# ----------------------------------------------------------------------------------------------
# Perceptual loss
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """Random VGG16 `features.*` weights (the part the loss reads), plus random LPIPS lin weights."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (math.sqrt(2 / math.prod(s[1:])) if len(s) > 1 else 0.01)
          for k, s in shapes.items()}
    root = tmp_path_factory.mktemp("vgg")
    torch.save(sd, root / "vgg16_features.pth")
    widths = (64, 128, 256, 512, 512)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(widths)}
    torch.save({**sd, **lin}, root / "vgg16_lpips.pth")
    return root / "vgg16_features.pth", root / "vgg16_lpips.pth", sd, lin


def _torchmetrics_lpips_vgg():
    import torchmetrics.functional.image.lpips as tm_lpips

    path = Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


TORCHMETRICS_LPIPS_VGG = _torchmetrics_lpips_vgg()


def reference_perceptual(sd, lin, a, b):
    """torchvision's VGG16 run directly: ImageNet-normalised input, unit-normalised channels at the ReLUs
    after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3; sum over channels of w_c (a - b)^2, mean over batch
    and positions, summed over the five stages; w_c from the file, else LPIPS' weights shipped in torchmetrics."""
    from torchvision.models import vgg16

    with torch.device("meta"):  # no random init of the unused classifier (seconds)
        net = vgg16(weights=None).features
    net.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()}, assign=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    relus = [i for i, m in enumerate(net) if isinstance(m, torch.nn.ReLU)]
    taps = [relus[1], relus[3], relus[6], relus[9], relus[12]]  # the last ReLU of each of the 5 blocks

    def feats(x):
        x, out = ((x + 1) / 2 - mean) / std, []
        for i, layer in enumerate(net):
            x = layer(x)
            if i in taps:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    total = 0.0
    for s, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        w = (lin or TORCHMETRICS_LPIPS_VGG)[f"lin{s}.model.1.weight"]
        total = total + (w * (fa - fb) ** 2).sum(1).mean()
    return total, taps


@pytest.fixture(scope="module")
def perceptual_losses(vgg_weights):
    return {False: PerceptualLoss(vgg_weights[0]), True: PerceptualLoss(vgg_weights[1])}


@pytest.mark.parametrize("with_lin", [False, True])
def test_perceptual_loss_matches_vgg16_run_directly(vgg_weights, perceptual_losses, with_lin):
    _, _, sd, lin = vgg_weights
    loss = perceptual_losses[with_lin]
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        expected, taps = reference_perceptual(sd, lin if with_lin else None, a, b)
        got = loss(a, b)
    assert tuple(taps) == tuple(VGG16_TAPS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # grey images are compared as RGB copies
    torch.testing.assert_close(loss(a[:, :1], b[:, :1]), loss(a[:, :1].expand(-1, 3, -1, -1),
                                                               b[:, :1].expand(-1, 3, -1, -1)))


def test_perceptual_loss_has_its_own_gradient(perceptual_losses):
    loss = perceptual_losses[False]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    rec = (x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    loss(rec, x).backward()
    mse_grad = 2 * (rec.detach() - x) / x.numel()
    cos = F.cosine_similarity(rec.grad.flatten(), mse_grad.flatten(), dim=0)
    assert rec.grad.abs().sum() > 0 and cos < 0.99  # not a rescaled pixel loss
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training  # frozen, always in eval mode


# ----------------------------------------------------------------------------------------------
# Every option of the trainer changes the first step's gradient
# ----------------------------------------------------------------------------------------------
SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 grey PNGs of asymmetric blobs, and 8 CT-like float slices in HU (.npy: no modality recorded)."""
    root = tmp_path_factory.mktemp("tok_loss_data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    png_rows, ct_rows = [], []
    for i in range(8):
        img = np.zeros((SIZE, SIZE))
        for _ in range(3):
            cy, cx, s = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.6), rng.uniform(0.08, 0.2)
            img += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(root / f"img_{i}.png")
        np.save(root / f"ct_{i}.npy", (img * 1800 - 1000).astype(np.float32))  # air to bone, HU
        png_rows.append({"identifier": f"img_{i}.png", "label": 0, "split": "train"})
        ct_rows.append({"identifier": f"ct_{i}.npy", "label": 0, "split": "train"})
    write_metadata(png_rows, root / "png.csv")
    write_metadata(ct_rows, root / "ct.csv")
    return root


class FirstStepDone(Exception):
    pass


def first_step_gradients(meta, out, monkeypatch, *flags):
    """Every parameter's gradient in train_tokenizer's first step, read where the trainer clips them."""
    from scripts import train_tokenizer

    seen = []

    def spy(parameters, *args, **kwargs):
        seen.extend(p.grad.detach().clone() if p.grad is not None else None for p in parameters)
        raise FirstStepDone

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    args = train_tokenizer.get_parser().parse_args([
        "--train-data", str(meta), "--val-split", "none", "--out-dir", str(out), "--config", "MedITok-Tiny",
        "--image-size", str(SIZE), "--batch-size", "4", "--no-progress", "--no-tensorboard", *map(str, flags)])
    with pytest.raises(FirstStepDone):
        train_tokenizer.main(args)
    assert seen and any(g is not None for g in seen), "no gradient reached the clipping call"
    return seen


def differs(a, b):
    return len(a) != len(b) or any((x is None) != (y is None) or (x is not None and not torch.equal(x, y))
                                   for x, y in zip(a, b))


@pytest.fixture(scope="module")
def baselines(data, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {name: first_step_gradients(data / f"{name}.csv", tmp_path_factory.mktemp(f"base_{name}"), mp)
               for name in ("png", "ct")}
        again = first_step_gradients(data / "png.csv", tmp_path_factory.mktemp("base_again"), mp)
    finally:
        mp.undo()
        torch.set_num_threads(n)
    assert not differs(out["png"], again), "two identical runs gave different gradients"
    return out


OPTIONS = {
    "l1 off": ("png", ["--l1", 0]),
    "l2 off": ("png", ["--l2", 0]),
    "vq weight": ("png", ["--vq-weight", 3]),
    "entropy": ("png", ["--entropy-weight", 0.5]),
    # a discriminator small enough for 16 px images
    "GAN from step 0": ("png", ["--disc-weight", 0.5, "--disc-start", 0, "--disc-layers", 1, "--disc-width", 8]),
    "GAN, fixed weight": ("png", ["--disc-weight", 0.5, "--disc-start", 0, "--disc-layers", 1, "--disc-width", 8,
                                  "--no-disc-adaptive"]),
    "left-right flips": ("png", ["--hflip", 1.0]),
    "random CT windows": ("ct", ["--random-ct-window"]),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_loss_option_changes_the_gradient(name, data, baselines, tmp_path, monkeypatch):
    dataset, flags = OPTIONS[name]
    grads = first_step_gradients(data / f"{dataset}.csv", tmp_path, monkeypatch, *flags)
    assert differs(grads, baselines[dataset]), f"{name} ({' '.join(flags)}) left the gradient unchanged"


def test_perceptual_option_and_its_weight_change_the_gradient(data, baselines, vgg_weights, tmp_path, monkeypatch):
    """--perceptual-weights adds the term; a different --perceptual-weight changes it again (the weight is
    read, not only the file)."""
    a = first_step_gradients(data / "png.csv", tmp_path / "a", monkeypatch, "--perceptual-weights", vgg_weights[0])
    b = first_step_gradients(data / "png.csv", tmp_path / "b", monkeypatch, "--perceptual-weights", vgg_weights[0],
                             "--perceptual-weight", 4)
    assert differs(a, baselines["png"]) and differs(a, b)
