"""sample_c2i against independent references: every image is `decode(generate(label, seed))` for its own
row, and every sampling flag reaches `generate`.

A MedITok-Tiny tokenizer (32 px, 4x4 grid, 8 codebooks of 512 codes) and a small GPT of matching shape,
both with random weights (a barely trained GPT would make every label sample alike). The reference images
are made here from `models.generate.generate` and the tokenizer's `idx_to_img`, converted to uint8 by the
formula below, never through sample_c2i's own helpers.
"""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from evaluation.generation import sample_c2i
from models.checkpoint import atomic_save
from models.generate import generate
from models.gpt import ModelArgs, Transformer
from models.meditok import build_meditok, save_meditok

CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """One intra-op thread for the module-scoped fixtures too: tiny models only lose on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(one_thread_for_the_module, tmp_path_factory):
    """(tokenizer, GPT, tokenizer checkpoint, GPT checkpoint) with random weights."""
    root = tmp_path_factory.mktemp("sample_refs")
    torch.manual_seed(0)
    vq = build_meditok(model_name="MedITok-Tiny", img_size=32)  # few positions: fast sampling
    vq_path = root / "vq.pt"
    save_meditok(vq, vq_path)
    config = ModelArgs(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=CLASSES,
                       num_codebooks=vq.num_codebooks, vocab_size=vq.vocab_size, block_size=vq.grid_size ** 2,
                       token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    gpt = Transformer(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere (the default init zeroes the head: every code a tie)
        for p in gpt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    gpt_path = root / "gpt.pt"
    atomic_save({"config": asdict(config), "model": gpt.state_dict()}, gpt_path)
    return vq, gpt.eval(), vq_path, gpt_path


def sample(models, out, *flags):
    _, _, vq_path, gpt_path = models
    argv = ["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", out, "--num-per-class", 2,
            "--per-proc-batch-size", 4, *flags]
    run_dir = sample_c2i.main(sample_c2i.get_parser().parse_args([str(a) for a in argv]))
    data = np.load(run_dir / "samples.npz")
    return data["samples"], data["labels"].tolist()


def reference_images(vq, codes):
    """codes [B, K, L] -> uint8 [B, H, W, 3]: [-1, 1] mapped linearly onto 0..255 and rounded."""
    with torch.no_grad():
        img = vq.idx_to_img(codes).clamp(-1, 1)
    return ((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def assert_same_images(got, expected):
    # Batches of another size may round a pixel the other way; a wrong image differs everywhere.
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"{(diff.reshape(len(diff), -1) > 1).any(1).sum()} of {len(diff)} images differ"


def test_each_greedy_image_is_decode_of_generate_for_its_own_label(models, tmp_path):
    """top-k 1 makes sampling greedy, so a row's image depends on its label alone: generate it here, one
    label at a time. Fails if labels are permuted inside a batch or images land at another index."""
    vq, gpt, *_ = models
    images, labels = sample(models, tmp_path, "--cfg-scale", 2.0, "--top-k", 1)
    assert labels == [c for c in range(CLASSES) for _ in range(2)]
    expected = np.concatenate([
        reference_images(vq, generate(gpt, torch.tensor([label]), gpt.config.block_size, cfg_scale=2.0,
                                      sample_logits=False))
        for label in labels])
    assert_same_images(images, expected)
    # the labels matter: the classes' images differ from each other
    assert not np.array_equal(expected[0], expected[2]) and not np.array_equal(expected[2], expected[4])


def test_each_sampled_image_is_decode_of_generate_with_the_documented_seed(models, tmp_path):
    """Random sampling: one process seeds one generator with global_seed * world_size + rank and draws the
    batches of --per-proc-batch-size rows in index order (the documented convention)."""
    vq, gpt, *_ = models
    seed = 5
    images, labels = sample(models, tmp_path, "--cfg-scale", 1.5, "--global-seed", seed)
    generator = torch.Generator().manual_seed(seed * 1 + 0)
    expected = []
    for start in range(0, len(labels), 4):
        codes = generate(gpt, torch.tensor(labels[start:start + 4]), gpt.config.block_size, cfg_scale=1.5,
                         generator=generator)
        expected.append(reference_images(vq, codes))
    assert_same_images(images, np.concatenate(expected))


FLAGS = {  # flag -> (value, the generate() keyword it must reach)
    "--cfg-scale": (2.5, "cfg_scale"),
    "--cfg-interval": (2, "cfg_interval"),
    "--cfg-schedule": ("linear", "cfg_schedule"),
    "--temperature": (0.6, "temperature"),
    "--top-k": (7, "top_k"),
    "--top-p": (0.8, "top_p"),
}


def test_every_sampling_flag_reaches_generate(models, tmp_path, monkeypatch):
    """A spy on the generate() that sample_c2i calls records its keywords; each flag arrives with its value."""
    calls = []

    def spy(model, cond, max_new_tokens, **kwargs):
        calls.append(kwargs)
        return generate(model, cond, max_new_tokens, **kwargs)

    monkeypatch.setattr(sample_c2i, "generate", spy)
    flags = [str(a) for flag, (value, _) in FLAGS.items() for a in (flag, value)]
    sample(models, tmp_path, *flags)
    assert len(calls) == 2  # 6 rows in batches of 4
    for kwargs in calls:
        assert {kw: kwargs.get(kw) for _, kw in FLAGS.values()} == {kw: v for v, kw in FLAGS.values()}
        assert isinstance(kwargs.get("generator"), torch.Generator)


@pytest.fixture(scope="module")
def baseline(one_thread_for_the_module, models, tmp_path_factory):
    return sample(models, tmp_path_factory.mktemp("baseline"), *BASE)[0]


BASE = ("--cfg-scale", "2.0", "--global-seed", "3")  # guidance on, so the interval and schedule can act


@pytest.mark.parametrize("flag", list(FLAGS))
def test_every_sampling_flag_changes_the_images(models, baseline, tmp_path, flag):
    """The same from the outputs alone: changing one flag from the baseline gives other images."""
    value = 4.0 if flag == "--cfg-scale" else FLAGS[flag][0]
    images = sample(models, tmp_path, *BASE, flag, value)[0]  # argparse: the later value wins
    assert images.shape == baseline.shape
    assert (images != baseline).any(axis=(1, 2, 3)).sum() >= 2, f"{flag} {value} left the images unchanged"
