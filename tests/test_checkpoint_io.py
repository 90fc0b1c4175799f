"""Checkpoint I/O: safe loading, unwrapping, strict errors that name keys, atomic saving."""
import os

import pytest
import torch
import torch.nn as nn

from models.checkpoint import (
    CheckpointError,
    atomic_save,
    extract_state_dict,
    load_checkpoint,
    load_state_dict_strict,
)


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    sd = _net().state_dict()
    path = tmp_path / "sub" / "ck.pt"
    atomic_save({"model": sd, "step": 3}, path)
    assert sorted(os.listdir(path.parent)) == ["ck.pt"]
    obj = load_checkpoint(path)
    assert obj["step"] == 3
    for k in sd:
        assert torch.equal(obj["model"][k], sd[k])


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _net()}, path)  # a pickled module, not plain tensors
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_safetensors_and_wrapped_dicts(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _net().state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    got, where = extract_state_dict(load_checkpoint(tmp_path / "w.safetensors"))
    assert where == "" and set(got) == set(sd)
    for key in ("model", "state_dict", "ema"):
        got, where = extract_state_dict({key: sd, "step": 1})
        assert where == key
    # EMA preferred when asked, model otherwise
    ema = {k: v + 1 for k, v in sd.items()}
    got, where = extract_state_dict({"model": sd, "ema": ema}, prefer=("ema", "model"))
    assert where == "ema" and torch.equal(got["0.weight"], ema["0.weight"])
    with pytest.raises(CheckpointError, match="top-level keys"):
        extract_state_dict({"foo": 1})


def test_strict_load_names_keys():
    net = _net()
    sd = net.state_dict()
    bad = dict(sd)
    bad.pop("0.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["2.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(_net(), bad, context="tiny MLP")
    msg = str(e.value)
    assert "0.bias" in msg and "extra.weight" in msg and "2.weight" in msg and "tiny MLP" in msg
    other = _net()
    load_state_dict_strict(other, sd)
    assert torch.equal(other[0].weight, net[0].weight)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
