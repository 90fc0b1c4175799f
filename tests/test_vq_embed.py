"""The released `--vq-embed-path` GPT: token embeddings from the tokenizer's quantizer + post_quant_proj
(frozen) and a trained LayerNorm-Linear-GELU-Linear projector (models/gpt.py: VQTokenEmbedder).

A MedITok-Tiny tokenizer (64 px, 8x8 grid, 8 codebooks of 512 codes, latent width 64, width 128) with
random weights; GPTs of a matching shape."""
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

from datasets.metadata import write_metadata
from evaluation.generation import sample_c2i, train_c2i
from models.checkpoint import atomic_save, load_checkpoint
from models.generate import generate, generate_naive
from models.gpt import ModelArgs, Transformer, VQTokenEmbedder, load_gpt, load_vq_embedding
from models.meditok import build_meditok, save_meditok

CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq_embed")
    torch.manual_seed(0)
    vq = build_meditok(model_name="MedITok-Tiny", img_size=64)
    path = root / "tok.pt"
    save_meditok(vq, path)
    return vq, path


def gpt_config(vq, **kw) -> ModelArgs:
    _, dims = load_vq_embedding_from(vq)
    return ModelArgs(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=CLASSES, num_codebooks=vq.num_codebooks,
                     vocab_size=vq.vocab_size, block_size=vq.grid_size ** 2, **dims, **kw)


def load_vq_embedding_from(vq):
    # The dims as the loader derives them from a tokenizer: width and latent width from post_quant_proj.
    return None, dict(vq_embed_width=vq.config.width, vq_embed_vocab_width=vq.vocab_width,
                      vq_embed_heads=vq.config.projection_heads)


def randomize(model, seed=1, std=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("tok_embeddings.quantizer.", "tok_embeddings.post_quant_proj.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("layout", ["ours", "released_plain", "released_trainer"])
def test_embedding_is_the_tokenizers_own_features(tokenizer, tmp_path, layout):
    """Every accepted tokenizer layout installs the same weights, and the embedding of codes is
    mm_projector(post_quant_proj(quantizer.idx_to_f(codes))) computed with the tokenizer itself."""
    vq, path = tokenizer
    if layout == "released_plain":
        path = tmp_path / "meditok_plain.pth"
        torch.save(vq.state_dict(), path)
    elif layout == "released_trainer":
        path = tmp_path / "trainer.pth"
        torch.save({"trainer": {"unitok": vq.state_dict()}}, path)
    part, dims = load_vq_embedding(path)
    assert dims == load_vq_embedding_from(vq)[1]
    model = Transformer(gpt_config(vq)).eval()
    model.tok_embeddings.load_tokenizer(part, context=str(path))
    codes = torch.randint(0, vq.codebook_size, (2, vq.num_codebooks, 5))
    with torch.no_grad():
        expected = model.tok_embeddings.mm_projector(vq.post_quant_proj(vq.quantizer.idx_to_f(codes)))
        got = model.tok_embeddings(codes)
    torch.testing.assert_close(got, expected)


def test_key_names_are_the_released_ones(tokenizer):
    """tok_embeddings.* = the tokenizer's quantizer.* and post_quant_proj.* keys under the same names, plus
    mm_projector.{0,1,3} (LayerNorm, Linear, GELU without weights, Linear) as in the released GPT."""
    vq, _ = tokenizer
    model = Transformer(gpt_config(vq))
    ours = {k[len("tok_embeddings."):] for k in model.state_dict() if k.startswith("tok_embeddings.")}
    tok_keys = {k for k in vq.state_dict() if k.startswith(("quantizer.", "post_quant_proj."))}
    projector = {f"mm_projector.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    assert ours == tok_keys | projector
    assert isinstance(model.tok_embeddings.mm_projector[0], nn.LayerNorm)
    assert isinstance(model.tok_embeddings.mm_projector[2], nn.GELU)


def test_checkpoint_without_config_loads_strictly(tokenizer, tmp_path):
    """A released-style checkpoint (weights under "model", no config): load_gpt infers the variant and
    its sizes from the shapes, and the model computes the same function."""
    vq, path = tokenizer
    part, _ = load_vq_embedding(path)
    model = Transformer(gpt_config(vq, cls_token_num=1)).eval()
    model.tok_embeddings.load_tokenizer(part)
    randomize(model)
    ckpt = tmp_path / "released_vq_embed.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    loaded, _ = load_gpt(ckpt, n_head=4, block_size=vq.grid_size ** 2)
    assert isinstance(loaded.tok_embeddings, VQTokenEmbedder)
    c = loaded.config
    assert (c.vq_embed_width, c.vq_embed_vocab_width, c.vq_embed_heads) == (128, 64, 2)
    codes = torch.randint(0, vq.codebook_size, (2, vq.num_codebooks, vq.grid_size ** 2))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes[:, :, :-1], labels, codes)[1], model(codes[:, :, :-1], labels, codes)[1])
    # A key that is not there is named.
    sd = model.state_dict()
    del sd["tok_embeddings.mm_projector.3.bias"]
    torch.save({"model": sd}, ckpt)
    with pytest.raises(Exception, match="tok_embeddings.mm_projector.3.bias"):
        load_gpt(ckpt, n_head=4, block_size=vq.grid_size ** 2)


def test_tokenizer_part_stays_frozen(tokenizer):
    vq, path = tokenizer
    part, _ = load_vq_embedding(path)
    model = Transformer(gpt_config(vq))
    model.tok_embeddings.load_tokenizer(part)
    before = {k: v.clone() for k, v in model.tok_embeddings.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    codes = torch.randint(0, vq.codebook_size, (4, vq.num_codebooks, vq.grid_size ** 2))
    _, loss = model(codes[:, :, :-1], torch.tensor([0, 1, 2, 0]), codes)
    loss.backward()
    opt.step()
    after = model.tok_embeddings.state_dict()
    frozen = [k for k in before if not k.startswith("mm_projector.")]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["mm_projector.1.weight"], after["mm_projector.1.weight"])
    assert all(p.grad is None for n, p in model.tok_embeddings.named_parameters() if not n.startswith("mm_projector."))


def test_cached_generation_equals_the_uncached_reference(tokenizer):
    """The projection is causal over positions: cached decoding must give each position the embedding it
    has when the whole prefix is embedded at once (generate_naive reruns the full prefix every step)."""
    vq, path = tokenizer
    part, _ = load_vq_embedding(path)
    model = Transformer(gpt_config(vq, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
    model.tok_embeddings.load_tokenizer(part)
    randomize(model).eval()
    labels = torch.tensor([0, 1, 2])
    for cfg in (1.0, 2.0):
        cached = generate(model, labels, model.block_size, cfg_scale=cfg, cfg_interval=3, sample_logits=False)
        naive = generate_naive(model, labels, model.block_size, cfg_scale=cfg, cfg_interval=3, sample_logits=False)
        assert torch.equal(cached, naive), f"cfg {cfg}"
    assert not model.tok_embeddings.decoding and model.tok_embeddings.history is None


@pytest.mark.slow
def test_train_then_sample_end_to_end(tokenizer, tmp_path):
    """train_c2i --vq-embed-path (released trainer format) -> a checkpoint whose config and weights say so
    -> sample_c2i --vq_embed_path decodes images."""
    vq, path = tokenizer
    trainer_format = tmp_path / "unitok_trainer.pth"
    torch.save({"trainer": {"unitok": vq.state_dict()}}, trainer_format)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        torch.save(torch.randint(0, vq.codebook_size, (vq.num_codebooks, vq.grid_size, vq.grid_size), generator=g),
                   tmp_path / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % CLASSES,
                     "split": "train" if i < 6 else "test"})
    write_metadata(rows, tmp_path / "codes.jsonl")
    train_c2i.main(train_c2i.get_parser().parse_args([
        "--code-dir", str(tmp_path / "codes.jsonl"), "--results-dir", str(tmp_path), "--exp-name", "vq",
        "--gpt-model", "GPT-Tiny", "--vocab-size", str(vq.vocab_size), "--num-classes", str(CLASSES),
        "--global-batch-size", "4", "--max-steps", "2", "--no-compile", "--no-tensorboard",
        "--vq-embed-path", str(trainer_format)]))
    ckpt_path = tmp_path / "vq" / "checkpoints" / "latest.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["config"]["vq_embed_width"] == vq.config.width
    for k, v in vq.state_dict().items():  # the tokenizer part did not move while training
        if k.startswith(("quantizer.", "post_quant_proj.")):
            assert torch.equal(ckpt["model"][f"tok_embeddings.{k}"], v), k
    run_dir = sample_c2i.main(sample_c2i.get_parser().parse_args([
        "--gpt_ckpt", str(ckpt_path), "--vq_ckpt", str(path), "--vq_embed_path", str(path),
        "--test_data_path", str(tmp_path / "codes.jsonl"), "--sample_dir", str(tmp_path / "s"),
        "--cfg_scale", "2.0", "--no-prepack"]))
    assert len(list(run_dir.glob("*/*.png"))) == 2 and (run_dir / "samples.npz").is_file()
    with pytest.raises(ValueError, match="compile"):
        sample_c2i.main(sample_c2i.get_parser().parse_args([
            "--gpt-ckpt", str(ckpt_path), "--vq-ckpt", str(path), "--num-per-class", "1", "--compile"]))


def test_vq_embed_path_on_a_plain_gpt_is_an_error(tokenizer, tmp_path):
    vq, path = tokenizer
    config = ModelArgs(dim=64, n_layer=1, n_head=4, multiple_of=32, num_classes=CLASSES, num_codebooks=vq.num_codebooks,
                       vocab_size=vq.vocab_size, block_size=vq.grid_size ** 2)
    atomic_save({"config": asdict(config), "model": Transformer(config).state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="one table per codebook"):
        sample_c2i.main(sample_c2i.get_parser().parse_args([
            "--gpt-ckpt", str(tmp_path / "plain.pt"), "--vq-ckpt", str(path), "--vq-embed-path", str(path),
            "--num-per-class", "1", "--sample-dir", str(tmp_path / "s")]))


def test_embedding_tokenizer_must_be_the_one_that_made_the_codes(tokenizer, tmp_path):
    """Codes whose manifest names tokenizer A, --vq-embed-path tokenizer B (same shapes, other weights):
    train_c2i refuses, naming both files."""
    from datasets.manifest import build_manifest, write_manifest

    vq, path = tokenizer
    other = tmp_path / "other_tok.pt"
    torch.manual_seed(5)
    save_meditok(build_meditok(model_name="MedITok-Tiny", img_size=64), other)
    codes = tmp_path / "codes"
    codes.mkdir()
    rows = []
    for i in range(4):
        torch.save(torch.zeros(vq.num_codebooks, vq.grid_size, vq.grid_size, dtype=torch.long), codes / f"{i}.pt")
        rows.append({"identifier": f"{i}.png", "code_identifier": f"{i}.pt", "label": i % CLASSES, "split": "train"})
    write_metadata(rows, codes / "metadata.jsonl")
    write_manifest(codes, build_manifest(vq.config, path, image_size=64, infer_type="code"))
    argv = ["--code-dir", str(codes), "--results-dir", str(tmp_path), "--exp-name", "x", "--gpt-model", "GPT-Tiny",
            "--num-classes", str(CLASSES), "--global-batch-size", "2", "--max-steps", "1", "--no-compile",
            "--no-tensorboard", "--vq-embed-path", str(other)]
    with pytest.raises(ValueError, match=r"other_tok\.pt.*tok\.pt"):
        train_c2i.main(train_c2i.get_parser().parse_args(argv))
