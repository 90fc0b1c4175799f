"""The tokenization manifest (datasets/manifest.py): contents, lookup, differences, tokenizer check."""
import hashlib
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.image_dataset import ImageDataset
from datasets.manifest import (
    MANIFEST_NAME,
    build_manifest,
    check_tokenizer,
    manifest_differences,
    preprocessing_options,
    read_manifest,
    tokenizer_sha256,
    write_manifest,
)
from models.meditok import MEDITOK_CONFIGS, build_meditok

TINY = MEDITOK_CONFIGS["MedITok-Tiny"]


def weights(tmp_path, name="w.pt", payload=b"weights"):
    path = tmp_path / name
    path.write_bytes(payload * 1000)
    return path


def test_sha256_matches_hashlib_and_follows_changes(tmp_path):
    path = weights(tmp_path)
    assert tokenizer_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"other" * 999)  # new size -> not served from the cache
    assert tokenizer_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shapes_match_the_model(tmp_path):
    """Codebooks, vocabulary, grid and output shapes agree with what the tokenizer actually produces."""
    torch.manual_seed(0)
    model = build_meditok(model_name="MedITok-Tiny", img_size=32)
    m = build_manifest(TINY, weights(tmp_path), image_size=32, infer_type="code")
    with torch.no_grad():
        idx = model.img_to_idx(torch.zeros(1, 3, 32, 32))  # [1, K, L]
    K, L = idx.shape[1:]
    assert m["num_codebooks"] == K and m["grid"][0] * m["grid"][1] == L
    assert m["output"] == {"shape": [K, *m["grid"]], "dtype": "int64"}
    assert m["codebook_size"] == model.quantizer.codebooks[0].codebook.weight.shape[0]
    assert m["vocab_size"] == K * m["codebook_size"]
    with torch.no_grad():
        latent = model.encode_image_vq(torch.zeros(1, 3, 32, 32))  # [1, L, vocab_width]
        vector = model.encode_image(torch.zeros(1, 3, 32, 32))
    assert build_manifest(TINY, weights(tmp_path), image_size=32, infer_type="latent")["output"]["shape"] == \
        [latent.shape[2], *m["grid"]]
    assert build_manifest(TINY, weights(tmp_path), image_size=32, infer_type="vector")["output"]["shape"] == \
        list(vector.shape[1:])
    with pytest.raises(ValueError, match="multiple"):
        build_manifest(TINY, weights(tmp_path), image_size=36, infer_type="code")


def test_written_manifest_is_found_from_folder_metadata_or_itself(tmp_path):
    m = build_manifest(TINY, weights(tmp_path), image_size=32, infer_type="code", window="abdomen", fit="crop")
    out = tmp_path / "codes"
    path = write_manifest(out, m)
    assert path == out / MANIFEST_NAME
    assert json.loads(path.read_text())["preprocessing"]["window"] == "abdomen"  # plain JSON
    (out / "metadata.csv").write_text("identifier,code_identifier\n")
    for where in (out, out / "metadata.csv", path):
        found = read_manifest(where)
        assert manifest_differences(found, m) == [] and found["tokenizer"] == m["tokenizer"]
    assert read_manifest(tmp_path) is None  # codes made before manifests existed
    path.write_text("{not json")
    with pytest.raises(ValueError, match=MANIFEST_NAME):
        read_manifest(out)
    path.write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_manifest(out)


def test_differences_name_what_changed(tmp_path):
    w1, w2 = weights(tmp_path, "a.pt", b"a"), weights(tmp_path, "b.pt", b"b")
    base = dict(image_size=32, infer_type="code")
    old = build_manifest(TINY, w1, **base)
    assert manifest_differences(old, build_manifest(TINY, w1, **base)) == []
    # a copy of the same weights elsewhere and another pixel cap change no output
    copy = tmp_path / "copy.pt"
    copy.write_bytes(w1.read_bytes())
    assert manifest_differences(old, build_manifest(TINY, copy, **base, max_pixels=10)) == []

    assert manifest_differences(old, build_manifest(TINY, w1, **base, fit="crop")) == ['fit: "pad" -> "crop"']
    assert manifest_differences(old, build_manifest(TINY, w1, **base, window="40,400")) == ['window: null -> "40,400"']
    diff = manifest_differences(old, build_manifest(TINY, w2, **base))
    assert diff == [f"tokenizer sha256: {tokenizer_sha256(w1)[:12]}… -> {tokenizer_sha256(w2)[:12]}…"]
    diff = manifest_differences(old, build_manifest(TINY, w1, image_size=64, infer_type="code"))
    assert "image_size: 32 -> 64" in diff and "grid: [4, 4] -> [8, 8]" in diff
    diff = manifest_differences(old, build_manifest(replace(TINY, vocab_size=2048), w1, **base))
    assert "tokenizer config vocab_size: 4096 -> 2048" in diff and "vocab_size: 4096 -> 2048" in diff
    assert manifest_differences(old, build_manifest(TINY, w1, image_size=32, infer_type="latent"))


def test_check_tokenizer_names_both_weight_files(tmp_path):
    w1, w2 = weights(tmp_path, "made.pt", b"a"), weights(tmp_path, "given.pt", b"b")
    m = build_manifest(TINY, w1, image_size=32, infer_type="code")
    assert check_tokenizer(m, w1) is None
    with pytest.raises(ValueError) as e:
        check_tokenizer(m, w2)
    for needle in ("made.pt", "given.pt", tokenizer_sha256(w1)[:16], tokenizer_sha256(w2)[:16]):
        assert needle in str(e.value)
    with pytest.warns(UserWarning, match="given.pt"):
        assert "made.pt" in check_tokenizer(m, w2, allow_mismatch=True)


def test_preprocessing_options_reproduce_the_settings(tmp_path):
    """ImageDataset built from the manifest preprocesses like one built with the original settings."""
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, (40, 24)).astype(np.int16)  # CT-like values, not square
    np.save(tmp_path / "ct.npy", arr)
    rows = [{"identifier": "ct.npy", "_line": 2}]
    settings = dict(window="40,400", intensity="auto", percentiles=(1.0, 99.0), fit="crop")
    m = build_manifest(TINY, weights(tmp_path), image_size=32, infer_type="code", model_input_min=0.0,
                       model_input_max=1.0, model_input_channel=3, max_pixels=10_000, **settings)
    m = read_manifest(write_manifest(tmp_path / "codes", m))  # through JSON: tuples become lists
    opts = preprocessing_options(m)
    assert opts["value_range"] == (0.0, 1.0) and opts["channels"] == 3 and opts["max_pixels"] == 10_000
    got = ImageDataset(rows, meta_path=tmp_path / "m.csv", **opts)[0]["image"]
    # the reference: the 40,400 window (level 40, width 400) applied by hand, then a centre crop, resize
    win = np.clip((arr.astype(np.float32) - (40 - 200)) / 400, 0, 1)
    top = (40 - 24) // 2
    crop = torch.from_numpy(win[top:top + 24, :])[None, None]
    ref = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(got, ref[0].clamp(0, 1).expand(3, -1, -1), atol=1e-5, rtol=0)
