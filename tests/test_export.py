"""`python -m models.export`: weights-only safetensors that load like the checkpoint they came from."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import CheckpointError, atomic_save, load_checkpoint
from models.export import export
from models.gpt import GPT_models, load_gpt
from models.meditok import MEDITOK_CONFIGS, build_meditok, save_meditok


def perturbed(state_dict):
    return {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in state_dict.items()}


def test_tokenizer_export_loads_alone_and_gives_identical_outputs(tmp_path, one_thread):
    torch.manual_seed(0)
    tok = build_meditok(model_name="MedITok-Tiny", img_size=MEDITOK_CONFIGS["MedITok-Tiny"].downsample * 4)
    ema = perturbed(tok.state_dict())
    save_meditok(tok, tmp_path / "tok.pt", extra={"ema": ema, "step": 5, "optimizer": {"state": {}}})
    info = export(str(tmp_path / "tok.pt"), tmp_path / "tok.safetensors", ema=True)
    assert info["weights"] == "ema" and info["kind"] == "meditok" and info["step"] == 5

    with safe_open(str(tmp_path / "tok.safetensors"), framework="pt") as f:  # plain safetensors, no pickle
        meta = f.metadata()
        assert json.loads(meta["config"]) == json.loads(json.dumps(asdict(tok.config)))
        assert int(meta["img_size"]) == tok.img_size and "optimizer" not in meta
        assert torch.equal(f.get_tensor("projection.weight"), ema["projection.weight"])

    x = torch.rand(2, 3, tok.img_size, tok.img_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from_pt = build_meditok(tmp_path / "tok.pt")  # prefers the EMA weights
    from_st = build_meditok(tmp_path / "tok.safetensors")
    assert from_st.config == tok.config and from_st.img_size == tok.img_size
    assert torch.equal(from_pt.img_to_idx(x), from_st.img_to_idx(x))
    assert torch.equal(from_pt.img_to_reconstructed_img(x), from_st.img_to_reconstructed_img(x))


def test_gpt_export_via_the_command_line_gives_identical_logits(tmp_path, one_thread):
    torch.manual_seed(0)
    gpt = GPT_models["GPT-Tiny"](vocab_size=64, num_codebooks=2, num_classes=3, block_size=4).eval()
    atomic_save({"config": asdict(gpt.config), "model": gpt.state_dict(), "ema": perturbed(gpt.state_dict()),
                 "gpt_model": "GPT-Tiny", "label_names": {0: "ct", 1: "mr", 2: "us"}, "steps": 3,
                 "optimizer": {"state": {}}, "rng": []}, tmp_path / "latest.pt")
    for flag, name in (([], "model"), (["--ema"], "ema")):
        out = tmp_path / f"gpt_{name}.safetensors"
        if flag:  # the command line once (a subprocess costs seconds), the function otherwise
            subprocess.run([sys.executable, "-m", "models.export", str(tmp_path / "latest.pt"), str(out), *flag],
                           check=True, capture_output=True)
        else:
            export(str(tmp_path / "latest.pt"), out)
        ckpt = load_checkpoint(out)
        assert ckpt["gpt_model"] == "GPT-Tiny" and ckpt["label_names"] == {0: "ct", 1: "mr", 2: "us"}
        assert ckpt["weights"] == name and "optimizer" not in ckpt and "rng" not in ckpt
        codes, labels = torch.randint(0, 32, (2, 2, 4)), torch.tensor([0, 2])
        a, _ = load_gpt(tmp_path / "latest.pt", prefer_ema=name == "ema")
        b, _ = load_gpt(out)
        with torch.no_grad():
            assert torch.equal(a(codes[:, :, :-1], labels)[0], b(codes[:, :, :-1], labels)[0])


def test_plain_state_dict_exports_as_it_is_and_ema_without_ema_is_refused(tmp_path):
    torch.manual_seed(0)
    sd = GPT_models["GPT-Tiny"](vocab_size=64, num_codebooks=2, num_classes=3, block_size=4).state_dict()
    atomic_save({"model": sd}, tmp_path / "released.pt")  # the released GPT-B layout: no config
    assert export(str(tmp_path / "released.pt"), tmp_path / "r.safetensors") == {}
    back = load_checkpoint(tmp_path / "r.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        export(str(tmp_path / "released.pt"), tmp_path / "e.safetensors", ema=True)
    with pytest.raises(ValueError, match=".safetensors"):
        export(str(tmp_path / "released.pt"), tmp_path / "out.pt")


def test_classifier_export_gives_the_same_features(tmp_path):
    from evaluation.features import ClassifierFeatures, build_classifier, classifier_kwargs, save_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet10t", 2, width=0.25).eval()
    save_classifier(model, tmp_path / "clf.pt", {"arch": "resnet10t", "model_kwargs": classifier_kwargs("resnet10t", 0.25),
                                                 "num_classes": 2, "class_names": ["ct", "mr"], "image_size": 16,
                                                 "in_chans": 3, "history": [{"epoch": 1}]})
    export(str(tmp_path / "clf.pt"), tmp_path / "clf.safetensors")
    a, b = ClassifierFeatures(tmp_path / "clf.pt"), ClassifierFeatures(tmp_path / "clf.safetensors")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a.logits(x), b.logits(x))
    assert b.class_names == ["ct", "mr"]
