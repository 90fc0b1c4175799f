"""Evaluation on real medical images (the 4-class demo set at 32 px): the classifier, the feature spaces,
the tokenizer and generation reports, and whether the numbers mean what they claim."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.demo import build_demo_dataset
from datasets.metadata import filter_split, read_metadata
from evaluation import metrics
from evaluation.features import (
    build_extractor,
    extract_features,
    load_classifier,
    load_images,
    to_uint8,
)
from evaluation.generation.evaluate import evaluate_generation, load_samples
from evaluation.tokenizer.evaluate import evaluate_tokenizer
from evaluation.train_classifier import main as train_classifier_main

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo set (4 classes of real images; val = one contiguous block per class) at 32 px."""
    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root, image_size=SIZE)
    return root / "metadata.csv"


@pytest.fixture(scope="module")
def real(demo):
    rows = read_metadata(demo)
    train_x, train_y = load_images(filter_split(rows, "train"), demo, image_size=SIZE)
    val_x, val_y = load_images(filter_split(rows, "val"), demo, image_size=SIZE)
    return train_x, train_y, val_x, val_y


@pytest.fixture(scope="module")
def classifier(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    args = argparse.Namespace(
        meta=str(demo), dataset_dir=None, train_split="train", val_split="val", image_size=SIZE, num_workers=0,
        arch="resnet10t", width=0.25, epochs=8, batch_size=64, lr=3e-3, weight_decay=0.05, augment=1.0, seed=0,
        device="cpu", out=str(out), codes=None)
    summary = train_classifier_main(args)
    return out, summary


@pytest.mark.slow
def test_classifier_reaches_high_heldout_accuracy_and_reloads(classifier, real):
    path, summary = classifier
    assert summary["val_accuracy"] >= 0.85, summary
    assert json.loads(path.with_suffix(".json").read_text())["val_accuracy"] == summary["val_accuracy"]
    # the checkpoint alone rebuilds the network, and its accuracy is what was reported
    model, info = load_classifier(path)
    _, _, val_x, val_y = real
    with torch.no_grad():
        acc = (model(val_x).argmax(1) == val_y).float().mean().item()
    assert acc == pytest.approx(summary["val_accuracy"])
    assert info["class_names"][3] == "echocardiography" and info["image_size"] == SIZE


@pytest.mark.slow
def test_fid_of_same_set_halves_far_below_noise_and_other_class(classifier, real):
    extractor = build_extractor("classifier", classifier_ckpt=classifier[0])
    train_x, train_y, _, _ = real
    feats = extract_features(extractor, train_x)
    labels = train_y.numpy()
    for c in range(4):
        own = feats[labels == c]
        half_a, half_b = own[0::2], own[1::2]  # interleaved slices: the same distribution
        other = feats[labels == (c + 1) % 4][: len(half_b)]
        noise = extract_features(extractor, torch.rand(len(half_b), 3, SIZE, SIZE) * 2 - 1)
        same = metrics.fid(half_a, half_b)
        assert same < 0.3 * metrics.fid(half_a, other), c
        assert same < 0.3 * metrics.fid(half_a, noise), c


@pytest.mark.slow
def test_generation_flags_copies_and_penalises_noise(demo, classifier, real, tmp_path):
    train_x, train_y, _, _ = real
    # "Samples" that are exact copies of training images: faithful classes, distances ~0 -> memorised.
    copies = tmp_path / "copies.npz"
    pick = torch.arange(0, len(train_x), 4)
    np.savez(copies, samples=to_uint8(train_x[pick]), labels=train_y[pick].numpy())
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "evaluation.generation.evaluate", "--real_meta", str(demo),
                    "--samples", str(copies), "--classifier_ckpt", str(classifier[0]), "--kid_subsets", "5",
                    "--out", str(out)], check=True, capture_output=True)
    got = json.loads((out / "generation_metrics.json").read_text())
    for name in ("generation_metrics.md", "generation_per_class.png", "nearest_neighbours.png"):
        assert (out / name).stat().st_size > 0
    assert got["sample_class_accuracy"] >= 0.9
    assert got["memorisation"]["fraction_below_threshold"] == 1.0
    assert got["memorisation"]["nn_ratio"] < 0.05
    assert got["precision"] == 1.0  # copies lie on the real manifold

    # Noise "samples" with the same labels: class fidelity collapses, FID explodes.
    noise = (torch.rand(len(pick), 3, SIZE, SIZE) * 2 - 1)
    bad = evaluate_generation(demo, (to_uint8(noise), train_y[pick].numpy()), classifier_ckpt=classifier[0],
                              kid_subsets=5)
    assert bad["sample_class_accuracy"] < 0.6
    assert bad["fid"] > 5 * got["fid"] and bad["kid_mean"] > got["kid_mean"]
    assert bad["precision"] < 0.1
    assert bad["memorisation"]["fraction_below_threshold"] == 0.0


def test_samples_folder_reads_like_the_npz(tmp_path):
    names = ["a", "b"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0, 1])
    np.savez(tmp_path / "s.npz", samples=images, labels=labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "run" / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "run" / names[label] / f"{i:04d}.png")
    from_npz = load_samples(tmp_path / "s.npz", names)
    from_dir = load_samples(tmp_path / "run", names)
    order = np.lexsort((np.arange(5), labels))  # the folder is read class by class
    assert (from_dir[1] == labels[order]).all() and (from_dir[0] == images[order]).all()
    assert (from_npz[0] == images).all()
    (tmp_path / "run" / "b").rename(tmp_path / "run" / "class_1")  # sample_c2i.py's name for unnamed classes
    assert (load_samples(tmp_path / "run", names)[1] == labels[order]).all()
    (tmp_path / "run" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        load_samples(tmp_path / "run", names)
    (tmp_path / "s.npz").rename(tmp_path / "run" / "samples.npz")  # a run folder's npz wins (exact, in order)
    assert (load_samples(tmp_path / "run", names)[1] == labels).all()


def _tiny_tokenizer():
    from models.meditok import build_meditok

    torch.manual_seed(0)
    return build_meditok(model_name="MedITok-Tiny", img_size=SIZE, width=64, depth=1, decoder_depth=1,
                         num_heads=2, vocab_size=1024, decoder_widths=(32, 16))


@pytest.mark.slow
def test_trained_tokenizer_reconstructs_better_than_untrained(demo, real, tmp_path):
    from models.meditok import save_meditok

    train_x = real[0]
    untrained = _tiny_tokenizer()
    save_meditok(untrained, tmp_path / "untrained.pt")
    model = _tiny_tokenizer().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):  # ~4 dB above the untrained model after 10 steps already
        x = train_x[torch.randint(len(train_x), (16,), generator=generator)]
        out = model(x)
        loss = (out["rec"] - x).pow(2).mean() + out["vq_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    before = evaluate_tokenizer(demo, tmp_path / "untrained.pt", split="val", feature_space=None)
    after = evaluate_tokenizer(demo, model.eval(), split="val", out=tmp_path / "report", worst_k=4)
    assert after["recon_psnr_db"] > before["recon_psnr_db"] + 3, (before["recon_psnr_db"], after["recon_psnr_db"])
    assert after["recon_ssim"] > before["recon_ssim"]
    # per-class numbers average back to the overall ones
    counts = {k: v["count"] for k, v in after["per_class"].items()}
    weighted = sum(v["psnr_db"] * v["count"] for v in after["per_class"].values()) / sum(counts.values())
    assert weighted == pytest.approx(after["recon_psnr_db"], rel=1e-6)
    assert after["num_images"] == sum(counts.values()) and after["rfid"] is not None
    assert after["worst"][0]["psnr_db"] <= min(v["psnr_db"] for v in after["per_class"].values())
    for name in ("tokenizer_metrics.json", "tokenizer_metrics.md", "tokenizer_per_class.png", "tokenizer_worst.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


@pytest.mark.slow
def test_inception_features_come_from_a_local_state_dict_loaded_strictly(tmp_path):
    from torchvision.models import inception_v3

    weights = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(), weights)
    extractor = build_extractor("inception", inception_weights=weights)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    feats = extract_features(extractor, images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    broken = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("Mixed_7c")}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="Mixed_7c"):
        build_extractor("inception", inception_weights=tmp_path / "broken.pt")


@pytest.mark.slow
def test_fid_inception_weights_run_through_torchmetrics(tmp_path, monkeypatch):
    """A stand-in for the FID Inception weights (random tensors, the 1008-class layout of torch-fidelity's
    weights-inception-2015-12-05 file) runs in torchmetrics' FID network; our FID of its features equals
    torchmetrics' FrechetInceptionDistance fed the same images."""
    from torchvision.models import inception_v3

    weights = tmp_path / "weights-inception-standin.pt"
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008).state_dict(), weights)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as where the package is not installed
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        build_extractor("inception", inception_weights=weights)
    monkeypatch.delitem(sys.modules, "torch_fidelity")
    pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = build_extractor("inception", inception_weights=weights)
    assert extractor.kind == "fid"
    g = torch.Generator().manual_seed(0)
    real_u8 = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    fake_u8 = (real_u8.float() * 0.5).to(torch.uint8)
    to_float = lambda u8: u8.float() / 127.5 - 1  # noqa: E731  (what the evaluators hand the extractor)
    ours = metrics.fid(extract_features(extractor, to_float(real_u8)), extract_features(extractor, to_float(fake_u8)))
    reference = FrechetInceptionDistance(feature=extractor.model)  # torchmetrics' own FID on uint8 images
    reference.update(real_u8, real=True)
    reference.update(fake_u8, real=False)
    assert ours == pytest.approx(reference.compute().item(), rel=1e-3, abs=1e-3)


def test_feature_space_without_its_file_says_which_flag(tmp_path):
    with pytest.raises(ValueError, match="--classifier_ckpt"):
        build_extractor("classifier")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        build_extractor("meditok", meditok_ckpt=tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="unknown feature space"):
        build_extractor("pixels")


def _ct_codes_folder(tmp_path):
    """Four HU slices (.npy, ramps from -1000 to 1000 HU) and a code folder whose manifest says they were
    tokenized with --window abdomen (level 40, width 400 -> [-160, 240] HU)."""
    from datasets.manifest import build_manifest, write_manifest
    from datasets.metadata import write_metadata
    from models.meditok import MEDITOK_CONFIGS

    data, codes = tmp_path / "ct", tmp_path / "codes"
    data.mkdir()
    ramp = np.linspace(-1000, 1000, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    rows = []
    for i in range(4):
        np.save(data / f"slice{i}.npy", ramp + 50 * i)
        rows.append({"identifier": str(data / f"slice{i}.npy"), "code_identifier": f"slice{i}.pt", "label": i % 2,
                     "label_name": ["liver", "kidney"][i % 2], "split": "train" if i < 2 else "val"})
    write_metadata(rows, codes / "metadata.jsonl")
    (tmp_path / "tok.pt").write_bytes(b"weights")
    write_manifest(codes, build_manifest(MEDITOK_CONFIGS["MedITok-Tiny"], tmp_path / "tok.pt", image_size=SIZE,
                                         infer_type="code", window="abdomen"))
    return codes, ramp


def test_evaluators_read_real_ct_with_the_window_the_codes_were_made_with(tmp_path):
    from evaluation.features import image_loader, manifest_read_options

    codes, ramp = _ct_codes_folder(tmp_path)
    meta = codes / "metadata.jsonl"
    options, manifest = manifest_read_options(None, meta)  # found beside the code metadata
    assert options["window"] == "abdomen" and manifest["_path"] == str(codes / "tokenizer.json")
    assert manifest_read_options(codes, tmp_path / "elsewhere.csv")[0] == options  # or named with --codes
    rows = read_metadata(meta)
    image = next(iter(image_loader(rows[:1], meta, image_size=SIZE, **options)))["image"][0, 0]
    expected = np.clip((ramp + 160) / 400, 0, 1) * 2 - 1  # the abdomen window by hand, to [-1, 1]
    assert np.abs(image.numpy() - expected).max() < 1e-5
    default = next(iter(image_loader(rows[:1], meta, image_size=SIZE)))["image"][0, 0]
    assert np.abs(default.numpy() - expected).max() > 0.5  # what the evaluators silently did before

    result = evaluate_tokenizer(meta, _tiny_tokenizer(), split="val", feature_space=None)
    assert result["real_preprocessing"]["window"] == "abdomen" and result["manifest"] == manifest["_path"]
    with pytest.raises(FileNotFoundError, match="no tokenization manifest"):
        manifest_read_options(tmp_path / "ct", meta)


def test_reference_batch_and_samples_npz_have_the_adm_layout(tmp_path):
    """The ADM evaluator / torch-fidelity read `arr_0`, uint8 [N, H, W, 3]: the reference batch of real
    images (preprocessed as the codes were made) and sample_c2i's samples.npz both carry it."""
    from evaluation.generation import sample_c2i
    from evaluation.generation.reference_batch import main as reference_main

    codes, ramp = _ct_codes_folder(tmp_path)
    out = tmp_path / "ref.npz"
    reference_main(argparse.Namespace(meta=str(codes / "metadata.jsonl"), split="all", codes=str(codes),
                                      image_size=None, dataset_dir=None, batch_size=3, num_workers=0, out=str(out)))
    with np.load(out) as ref:
        assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (4, SIZE, SIZE, 3)
        assert ref["labels"].tolist() == [0, 1, 0, 1]
        windowed = np.clip((ramp + 50 * 3 + 160) / 400, 0, 1) * 255  # row 3, abdomen window, by hand
        assert np.abs(ref["arr_0"][3, ..., 0].astype(float) - windowed).max() <= 1
        assert (ref["arr_0"][..., 0] == ref["arr_0"][..., 2]).all()
        images, labels = load_samples(out, ["liver", "kidney"])  # our evaluator reads the layout too
        assert np.array_equal(images, ref["arr_0"])

    paths, rng = [], np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / "run" / "c0" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    args = sample_c2i.get_parser().parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--grid-columns", "2"])
    sample_c2i.gather_outputs(args, tmp_path / "run", paths, [0, 0, 0], ["c0"], None)
    with np.load(tmp_path / "run" / "samples.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (3, SIZE, SIZE, 3)
        assert np.array_equal(data["arr_0"][2], np.asarray(Image.open(paths[2])))


def test_tokenizer_report_psnr_is_absolute(tmp_path):
    """The evaluator's headline PSNR equals 10 log10(range^2 / MSE) for a known reconstruction: a stand-in
    tokenizer that returns 0.9 x (inside [-1, 1]) has MSE = 0.01 mean(x^2) per image, range 2."""
    from evaluation.features import image_loader, manifest_read_options

    class Shrink(torch.nn.Module):
        img_size = SIZE

        def img_to_reconstructed_img(self, x):
            return 0.9 * x

    codes, _ = _ct_codes_folder(tmp_path)
    meta = codes / "metadata.jsonl"
    result = evaluate_tokenizer(meta, Shrink(), split="val", feature_space=None)
    options, _ = manifest_read_options(None, meta)
    x = torch.cat([b["image"] for b in image_loader(filter_split(read_metadata(meta), "val"), meta, image_size=SIZE,
                                                    **options)])
    mse = (0.01 * x.double() ** 2).flatten(1).mean(1)
    expected = (10 * torch.log10(2.0 ** 2 / mse)).mean().item()
    assert result["recon_psnr_db"] == pytest.approx(expected, abs=1e-4)
