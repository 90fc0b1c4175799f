"""The class-to-image GPT: parity with the released model, registry, invariants, loading."""
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, atomic_save, load_state_dict_strict
from models.gpt import GPT_SIZES, GPT_models, ModelArgs, Transformer, infer_config, load_gpt

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "gpt_c2i_tiny_reference.pt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU a 2-thread GEMM waits for a
    descheduled thread at every call (25x slower measured); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layer=2, n_head=4, n_output_layer=1, vocab_size=128, num_codebooks=4, block_size=16,
                num_classes=3, multiple_of=32, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return ModelArgs(**{**base, **kw})


def randomize(model: Transformer, seed: int = 0, std: float = 0.3) -> Transformer:
    """Random weights everywhere (the default init zeroes linear_head, which makes every code a tie)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_batch(config: ModelArgs, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.sub_vocab_size, (B, config.num_codebooks, config.block_size), generator=g)
    labels = torch.randint(0, config.num_classes, (B,), generator=g)
    return codes, labels


# ----------------------------------------------------------------------------------------------
# Parity with the released implementation (fixture computed by the official code)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def reference_model(ref) -> Transformer:
    model = Transformer(ModelArgs(**ref["config"]))
    return load_state_dict_strict(model, ref["state_dict"], context="reference fixture")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reference_teacher_forcing(reference, mode):
    model = reference_model(reference).train(mode == "train")
    model.cls_embedding.dropout_prob = 0.0  # "every dropout off", label dropout included
    codes, labels = reference["codes"].long(), reference["labels"].long()
    logits, loss = model(codes[:, :, :-1], labels, targets=codes)
    expected = reference["teacher_forced_logits"]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    torch.testing.assert_close(loss, reference["teacher_forced_loss"], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Architecture and registry
# ----------------------------------------------------------------------------------------------
def test_gpt_b_keys_and_shapes_match_official():
    rows = [line.split("\t") for line in (DATA / "gpt_b_c2i_official.keys.tsv").read_text().splitlines() if line]
    official = {name: (tuple(int(d) for d in shape.split("x")), dtype.strip()) for name, shape, dtype in rows}
    with torch.device("meta"):
        model = GPT_models["GPT-B"](vocab_size=32768, num_codebooks=8, block_size=256, num_classes=6,
                                    cls_token_num=1, n_output_layer=1)
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    assert ours == official
    assert sum(v.numel() for v in model.state_dict().values()) == 142_375_168


@pytest.mark.parametrize("name", list(GPT_models))
def test_every_registry_size_builds(name):
    size = GPT_SIZES[name]
    small = size["dim"] <= 384
    device = "cpu" if small else "meta"  # the big ones only on the meta device
    with torch.device(device):
        model = GPT_models[name](vocab_size=32768, num_codebooks=8, block_size=16, num_classes=6)
    c = model.config
    assert (c.dim, c.n_layer, c.n_head) == (size["dim"], size["n_layer"], size["n_head"])
    assert len(model.layers) == size["n_layer"] and len(model.output.codebooks) == 7
    assert model.output.linear_head.weight.shape == (4096, size["dim"])
    if small:  # a real forward/backward pass
        model.train()
        codes, labels = random_batch(c, B=2)
        logits, loss = model(codes[:, :, :-1], labels, targets=codes)
        assert logits.shape == (2, 8, 16, 4096) and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def test_non_embedding_sizes_of_cpu_models():
    # GPT-Tiny ~1M and GPT-Small ~10-20M parameters outside the code embeddings and the head's linear layer.
    for name, lo, hi in (("GPT-Tiny", 0.5e6, 2e6), ("GPT-Small", 8e6, 20e6)):
        with torch.device("meta"):
            model = GPT_models[name](vocab_size=32768, num_codebooks=8, num_classes=6)
        n = sum(p.numel() for k, p in model.named_parameters() if "codebooks" not in k and "linear_head" not in k
                and "embedding_table" not in k)
        assert lo <= n <= hi, (name, n)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_codebooks=2, n_output_layer=2),
    dict(cls_token_num=3, n_kv_head=2),
    dict(num_codebooks=1),
])
def test_eval_loss_equals_train_loss_without_dropout(kw):
    config = tiny_args(class_dropout_prob=0.0, **kw)
    model = randomize(Transformer(config))
    codes, labels = random_batch(config)
    logits_t, loss_t = model.train()(codes[:, :, :-1], labels, targets=codes)
    logits_e, loss_e = model.eval()(codes[:, :, :-1], labels, targets=codes)
    assert logits_e.shape == (3, config.num_codebooks, config.block_size, config.sub_vocab_size)
    torch.testing.assert_close(logits_e, logits_t, rtol=0, atol=0)
    torch.testing.assert_close(loss_e, loss_t, rtol=0, atol=0)


def test_dropouts_are_active_in_train_mode_only():
    config = tiny_args(token_dropout_p=0.5, resid_dropout_p=0.5, ffn_dropout_p=0.5, drop_path_rate=0.5)
    model = randomize(Transformer(config))
    codes, labels = random_batch(config)
    torch.manual_seed(0)
    a = model.train()(codes[:, :, :-1], labels, targets=codes)[1]
    b = model.train()(codes[:, :, :-1], labels, targets=codes)[1]
    c = model.eval()(codes[:, :, :-1], labels, targets=codes)[1]
    d = model.eval()(codes[:, :, :-1], labels, targets=codes)[1]
    assert a != b and c == d


def test_model_is_causal_over_positions_and_codebooks():
    """Changing the codes of position t must not change logits of positions <= t (main stack), and
    changing codebook k of position t only affects codebooks > k of that position (head)."""
    config = tiny_args()
    model = randomize(Transformer(config)).eval()
    codes, labels = random_batch(config, B=1)
    t, k = 5, 1
    logits, _ = model(codes[:, :, :-1], labels, targets=codes)
    other = codes.clone()
    other[0, k, t] = (other[0, k, t] + 1) % config.sub_vocab_size
    logits2, _ = model(other[:, :, :-1], labels, targets=other)
    changed = (logits2 - logits).abs().amax(-1)[0] > 0  # [K, L]
    assert not changed[:, :t].any()  # earlier positions
    assert not changed[: k + 1, t].any() and changed[k + 1:, t].all()  # same position: later codebooks only
    assert changed[:, t + 1:].any()  # later positions see it


def test_forward_without_targets_feeds_argmax_codes_to_the_head():
    config = tiny_args()
    model = randomize(Transformer(config)).eval()
    codes, labels = random_batch(config)
    logits, loss = model(codes[:, :, :-1], labels)
    assert loss is None
    greedy = logits.argmax(-1)  # [B, K, L]
    forced, _ = model(codes[:, :, :-1], labels, targets=greedy)
    torch.testing.assert_close(forced, logits)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="square"):
        tiny_args(block_size=12)
    with pytest.raises(ValueError, match="num_codebooks"):
        tiny_args(vocab_size=130)
    with pytest.raises(ValueError, match="t2i"):
        tiny_args(model_type="i2i")
    model = Transformer(tiny_args())
    codes, labels = random_batch(model.config)
    with pytest.raises(ValueError, match="codebooks"):
        model(codes[:, :2, :-1], labels, targets=codes)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def test_load_gpt_our_checkpoint_prefers_ema(tmp_path):
    config = tiny_args()
    model, ema = randomize(Transformer(config), seed=1), randomize(Transformer(config), seed=2)
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "config": asdict(config), "step": 7}, path)
    loaded, ckpt = load_gpt(path)
    assert loaded.config == config and not loaded.training and ckpt["step"] == 7
    torch.testing.assert_close(loaded.state_dict(), ema.state_dict(), rtol=0, atol=0)
    loaded, _ = load_gpt(path, prefer_ema=False)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    codes, labels = random_batch(config)
    torch.testing.assert_close(loaded(codes[:, :, :-1], labels, codes)[0], model.eval()(codes[:, :, :-1], labels, codes)[0])


def test_load_gpt_released_layout_infers_the_config(tmp_path):
    # Released layout: weights under "model", no config. dim 128 is GPT-Tiny's, so n_head comes from the registry.
    config = ModelArgs(**{**asdict(tiny_args()), "dim": 128, "n_head": GPT_SIZES["GPT-Tiny"]["n_head"],
                          "n_output_layer": 2, "num_codebooks": 8, "vocab_size": 256, "num_classes": 5})
    model = randomize(Transformer(config))
    atomic_save({"model": model.state_dict()}, tmp_path / "released.pt")
    loaded, _ = load_gpt(tmp_path / "released.pt", block_size=16, token_dropout_p=0.0, resid_dropout_p=0.0,
                         ffn_dropout_p=0.0)
    # multiple_of is not recoverable from shapes; the SwiGLU width it produces is.
    assert {**asdict(loaded.config), "multiple_of": 0} == {**asdict(config), "multiple_of": 0}
    assert loaded.config.ffn_hidden_dim == config.ffn_hidden_dim
    codes, labels = random_batch(config)
    torch.testing.assert_close(loaded(codes[:, :, :-1], labels, codes)[0], model.eval()(codes[:, :, :-1], labels, codes)[0])
    with torch.device("meta"):  # and the real GPT-B layout infers the official GPT-B config
        gpt_b = GPT_models["GPT-B"](vocab_size=32768, num_codebooks=8, num_classes=6)
    inferred = infer_config(gpt_b.state_dict())
    assert {k: inferred[k] for k in ("dim", "n_layer", "n_head", "vocab_size", "num_codebooks", "num_classes",
                                     "cls_token_num", "n_output_layer", "block_size")} == dict(
        dim=768, n_layer=12, n_head=12, vocab_size=32768, num_codebooks=8, num_classes=6, cls_token_num=1,
        n_output_layer=1, block_size=256)
    assert ModelArgs(**inferred).ffn_hidden_dim == 2048


def test_load_gpt_names_mismatched_keys(tmp_path):
    config = tiny_args()
    sd = Transformer(config).state_dict()
    sd.pop("layers.1.ffn_norm.weight")
    sd["output.linear_head.bias"] = torch.zeros(3)
    sd["extra.weight"] = torch.zeros(1)
    atomic_save({"model": sd, "config": asdict(config)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_gpt(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "layers.1.ffn_norm.weight" in msg and "output.linear_head.bias" in msg and "extra.weight" in msg


def test_load_gpt_rejects_unknown_config_fields(tmp_path):
    config = tiny_args()
    atomic_save({"model": Transformer(config).state_dict(), "config": {**asdict(config), "bogus": 1}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="bogus"):
        load_gpt(tmp_path / "c.pt")
