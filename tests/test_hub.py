"""hf:// weights references, resolved offline through a pre-filled Hugging Face cache.

The cache layout is huggingface_hub's documented one: <cache>/models--<org>--<name>/refs/<branch> holds a
commit hash, and snapshots/<hash>/<path in repo> the files. With HF_HUB_OFFLINE=1 nothing is fetched.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict

import pytest
import torch

from models.checkpoint import atomic_save, download_command, load_checkpoint, parse_hub_reference, resolve_weights
from models.gpt import GPT_models, load_gpt
from models.meditok import MEDITOK_CONFIGS, build_meditok, save_meditok

REPO, COMMIT = "someone/meditok-test", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache under tmp_path; returns a function that puts a file into the snapshot."""
    cache = tmp_path / "hf_cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(src, path_in_repo):
        dst = repo / "snapshots" / COMMIT / path_in_repo
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        return dst

    return put


@pytest.fixture(scope="module")
def tiny_tokenizer():
    torch.manual_seed(0)
    return build_meditok(model_name="MedITok-Tiny", img_size=MEDITOK_CONFIGS["MedITok-Tiny"].downsample * 4)


def test_hf_tokenizer_gives_the_same_codes_as_the_local_file(hub_cache, tiny_tokenizer, tmp_path, one_thread):
    local = tmp_path / "tok.pt"
    save_meditok(tiny_tokenizer, local)
    hub_cache(local, "tokenizers/tok.pt")
    x = torch.rand(2, 3, tiny_tokenizer.img_size, tiny_tokenizer.img_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = build_meditok(local)
    for ref in (f"hf://{REPO}/tokenizers/tok.pt", f"hf://{REPO}/tokenizers/tok.pt@{COMMIT}",
                f"hf://{REPO}@main/tokenizers/tok.pt"):
        b = build_meditok(ref)
        assert torch.equal(a.img_to_idx(x), b.img_to_idx(x)), ref
        assert torch.equal(a.img_to_reconstructed_img(x), b.img_to_reconstructed_img(x)), ref


def test_hf_gpt_gives_the_same_logits_as_the_local_file(hub_cache, tmp_path, one_thread):
    torch.manual_seed(0)
    gpt = GPT_models["GPT-Tiny"](vocab_size=64, num_codebooks=2, num_classes=3, block_size=4).eval()
    local = tmp_path / "gpt.pt"
    atomic_save({"config": asdict(gpt.config), "model": gpt.state_dict(), "gpt_model": "GPT-Tiny"}, local)
    hub_cache(local, "gpt.pt")
    codes = torch.randint(0, 32, (2, 2, 4))
    labels = torch.tensor([0, 2])
    a, _ = load_gpt(local)
    b, _ = load_gpt(f"hf://{REPO}/gpt.pt")
    with torch.no_grad():
        assert torch.equal(a(codes[:, :, :-1], labels)[0], b(codes[:, :, :-1], labels)[0])


def test_offline_and_not_cached_says_which_command_downloads_it(hub_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_weights(f"hf://{REPO}/llamagen/missing.pt")
    message = str(e.value)
    assert "HF_HUB_OFFLINE" in message
    assert f"hf download {REPO} llamagen/missing.pt --local-dir weights/meditok-test" in message


def test_references_parse_in_both_revision_spellings():
    a = parse_hub_reference("hf://massaki75/meditok/llamagen_meditok/meditok_c2i_gptb.pt@v1")
    b = parse_hub_reference("hf://massaki75/meditok@v1/llamagen_meditok/meditok_c2i_gptb.pt")
    assert (a.id, a.path_in_repo, a.revision) == ("massaki75/meditok", "llamagen_meditok/meditok_c2i_gptb.pt", "v1")
    assert (b.id, b.path_in_repo, b.revision) == (a.id, a.path_in_repo, a.revision)
    assert download_command("hf://massaki75/meditok/meditok_simple_v1.pth") == \
        "hf download massaki75/meditok meditok_simple_v1.pth --local-dir weights/meditok"
    with pytest.raises(ValueError, match="names a repository, not a file"):
        parse_hub_reference("hf://massaki75/meditok")


def test_local_paths_are_untouched_and_missing_ones_are_clear(tmp_path):
    f = tmp_path / "w.pt"
    torch.save({"a": torch.ones(1)}, f)
    assert resolve_weights(f) == f and torch.equal(load_checkpoint(str(f))["a"], torch.ones(1))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_weights(tmp_path / "nope.pt")


def test_sampler_with_hf_references_writes_the_same_images_as_with_local_files(hub_cache, tmp_path, one_thread):
    """sample_c2i end to end (--gpt-ckpt / --vq-ckpt as hf://), and the tokenizer hash of the manifest check."""
    import numpy as np

    from datasets.manifest import build_manifest, check_tokenizer
    from evaluation.generation import sample_c2i

    torch.manual_seed(0)
    vq = build_meditok(model_name="MedITok-Tiny", img_size=32)
    save_meditok(vq, tmp_path / "vq.pt")
    gpt = GPT_models["GPT-Tiny"](vocab_size=vq.codebook_size * vq.num_codebooks, num_codebooks=vq.num_codebooks,
                                 num_classes=2, block_size=vq.grid_size ** 2).eval()
    atomic_save({"config": asdict(gpt.config), "model": gpt.state_dict(), "gpt_model": "GPT-Tiny"}, tmp_path / "gpt.pt")
    hub_cache(tmp_path / "vq.pt", "vq.pt")
    hub_cache(tmp_path / "gpt.pt", "c2i/gpt.pt")
    runs = []
    for gpt_path, vq_path in ((tmp_path / "gpt.pt", tmp_path / "vq.pt"), (f"hf://{REPO}/c2i/gpt.pt", f"hf://{REPO}/vq.pt")):
        argv = ["--gpt-ckpt", gpt_path, "--vq-ckpt", vq_path, "--sample-dir", tmp_path / "samples",
                "--num-per-class", "1", "--cfg-scale", "1.5", "--no-prepack"]
        runs.append(sample_c2i.main(sample_c2i.get_parser().parse_args([str(a) for a in argv])))
    with np.load(runs[0] / "samples.npz") as a, np.load(runs[1] / "samples.npz") as b:
        assert runs[0] != runs[1] and np.array_equal(a["samples"], b["samples"])
    manifest = build_manifest(vq.config, f"hf://{REPO}/vq.pt", image_size=32, infer_type="code")
    assert manifest["tokenizer"]["path"] == f"hf://{REPO}/vq.pt"
    assert check_tokenizer(manifest, tmp_path / "vq.pt") is None  # the same bytes as the local file
