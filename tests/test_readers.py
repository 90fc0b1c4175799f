"""datasets.readers and datasets.image_dataset on real files shipped by pydicom / pydicom-data / nibabel / nilearn.

Expected values come from the source libraries (pydicom, PIL, SimpleITK, nibabel) or from reading the same
pixels through another format, never from our own earlier output.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from torch.utils.data import DataLoader

from datasets import readers
from datasets.image_dataset import ImageDataset
from datasets.readers import CT_WINDOWS, ReadError, read_image, register_format, volume_shape


def dcm(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not installed (pydicom-data)")
    return path


NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["abdomen", "brain", "lung", "bone"])
def test_ct_window_uses_hounsfield_units(preset):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    level, width = CT_WINDOWS[preset]
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
    got = read_image(dcm("CT_small.dcm"), window=preset)
    assert got.shape == hu.shape + (1,)
    np.testing.assert_allclose(got[..., 0], expected, atol=1e-5)
    # the same window as numbers
    np.testing.assert_allclose(read_image(dcm("CT_small.dcm"), window=(level, width)), got)


def test_ct_without_window_uses_the_files_own_window():
    path = dcm("693_UNCI.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    level, width = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_allclose(read_image(path)[..., 0], np.clip((hu - level + width / 2) / width, 0, 1), atol=1e-5)


def test_window_is_not_applied_to_mr():
    # a CT window requested for a whole mixed dataset must leave an MR alone (percentile scaling)
    a = read_image(dcm("MR_small.dcm"), window="brain")
    b = read_image(dcm("MR_small.dcm"))
    np.testing.assert_array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.1


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    normal = read_image(dcm("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inv.dcm")
    np.testing.assert_allclose(read_image(tmp_path / "inv.dcm"), 1.0 - normal, atol=1e-6)


def test_multiframe_ybr_jpeg_frames_are_rgb_and_match_full_decode():
    path = dcm("examples_ybr_color.dcm")
    full = pydicom.dcmread(path).pixel_array  # pydicom converts YBR -> RGB
    assert volume_shape(path) == full.shape[:3]
    for k in (0, 17, full.shape[0] - 1):
        got = read_image(path, slice_index=k)
        assert got.shape == full.shape[1:]
        np.testing.assert_allclose(got, full[k] / 255.0, atol=1e-6)
    # the mean colour is not grey: RGB was kept
    assert np.abs(got[..., 0] - got[..., 2]).max() > 0.05
    with pytest.raises(ReadError, match="slice_index 30 outside"):
        read_image(path, slice_index=30)
    with pytest.raises(ReadError, match="needs a slice_index"):
        read_image(path)


def test_multiframe_mr_and_compressed_ct():
    path = dcm("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    k = 4
    lo, hi = np.percentile(frames[k], (0.5, 99.5))
    np.testing.assert_allclose(read_image(path, slice_index=k)[..., 0], np.clip((frames[k] - lo) / (hi - lo), 0, 1),
                               atol=1e-5)
    # JPEG 2000 lossless CT, decoded by the openjpeg plug-in
    j2k = read_image(dcm("J2K_pixelrep_mismatch.dcm"), window="brain", image_size=64, channels=3)
    assert j2k.shape == (64, 64, 3) and 0.1 < j2k.mean() < 0.9


def test_dicom_without_extension_is_detected(tmp_path):
    shutil.copy(dcm("CT_small.dcm"), tmp_path / "IM0001")
    np.testing.assert_array_equal(read_image(tmp_path / "IM0001", window="abdomen"),
                                  read_image(dcm("CT_small.dcm"), window="abdomen"))


# ----------------------------------------------------------------------------------------------
# Other formats: the same pixels through two formats must read the same
# ----------------------------------------------------------------------------------------------
def test_16bit_png_matches_its_dicom(tmp_path):
    ds = pydicom.dcmread(dcm("MR2_UNCI.dcm"))
    stored = ds.pixel_array
    assert stored.dtype == np.uint16
    Image.fromarray(stored).save(tmp_path / "mr.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "mr.png")), stored)  # exact round trip
    png = read_image(tmp_path / "mr.png")
    # the DICOM has a linear rescale (slope 3.77): percentile scaling is invariant to it
    np.testing.assert_allclose(png, read_image(dcm("MR2_UNCI.dcm")), atol=1e-4)
    assert 0.05 < png.mean() < 0.6  # not "mostly white" as an 8-bit reader would make it


def test_metaimage_written_from_dicom_matches(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.ReadImage(dcm("CT_small.dcm"))  # applies the rescale: HU
    sitk.WriteImage(img, str(tmp_path / "ct.mha"))
    sitk.WriteImage(img, str(tmp_path / "ct.mhd"))
    ref = read_image(dcm("CT_small.dcm"), window="mediastinum")
    np.testing.assert_allclose(read_image(tmp_path / "ct.mha", window="mediastinum"), ref, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "ct.mhd", window="mediastinum"), ref, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_and_metaimage_volumes_agree_on_orientation(tmp_path, axis):
    sitk = pytest.importorskip("SimpleITK")
    nii = NIBABEL_DATA / "anatomical.nii"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(tmp_path / "anat.mha"))
    shape = volume_shape(nii)
    assert shape == volume_shape(tmp_path / "anat.mha")
    k = shape[axis] // 2
    a = read_image(nii, slice_index=k, slice_axis=axis, intensity="minmax")
    b = read_image(tmp_path / "anat.mha", slice_index=k, slice_axis=axis, intensity="minmax")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_nifti_axial_slice_matches_nibabel_canonical_data():
    import nibabel as nib

    path = NIBABEL_DATA / "anatomical.nii"
    data = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj).astype(np.float64)  # [x, y, z]
    k = data.shape[2] // 2
    expected = data[:, :, k].T[::-1, ::-1]  # rows: anterior first; columns: patient right first
    lo, hi = expected.min(), expected.max()
    got = read_image(path, slice_index=k, slice_axis="axial", intensity="minmax")[..., 0]
    np.testing.assert_allclose(got, (expected - lo) / (hi - lo), atol=1e-5)


def test_nilearn_mni_template_slices():
    nilearn = pytest.importorskip("nilearn")
    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    shape = volume_shape(mni)
    assert sorted(shape) == [189, 197, 233]
    for axis in (0, 1, 2):
        img = read_image(mni, slice_index=shape[axis] // 2, slice_axis=axis, image_size=32, channels=3)
        assert img.shape == (32, 32, 3) and img.mean() > 0.1
        assert np.array_equal(img[..., 0], img[..., 2])  # grey replicated
    with pytest.raises(ReadError, match="needs a slice_index"):
        read_image(mni)


def test_jpeg_png_8bit_and_alpha(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), rgb / 255.0, atol=1e-6)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), rgb / 255.0, atol=1e-6)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    decoded = np.array(Image.open(tmp_path / "a.jpg"))
    np.testing.assert_allclose(read_image(tmp_path / "a.jpg"), decoded / 255.0, atol=1e-6)
    grey = read_image(tmp_path / "a.jpg", channels=1)
    assert grey.shape == (20, 30, 1)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.bmp")
    three = read_image(tmp_path / "g.bmp", channels=3)
    assert three.shape == (20, 30, 3) and np.array_equal(three[..., 0], three[..., 1])
    np.testing.assert_allclose(three[..., 0], rgb[..., 0] / 255.0, atol=1e-6)


def test_16bit_tiff(tmp_path):
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7)
    Image.fromarray(arr).save(tmp_path / "x.tif")
    got = read_image(tmp_path / "x.tif", intensity="minmax")[..., 0]
    np.testing.assert_allclose(got, (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-5)


def test_arrays_npy_npz_pt(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 4000, (5, 12, 10)).astype(np.int16)
    np.save(tmp_path / "v.npy", vol)
    got = read_image(tmp_path / "v.npy", slice_index=3, intensity="minmax")[..., 0]
    np.testing.assert_allclose(got, (vol[3] - vol[3].min()) / (vol[3].max() - vol[3].min()), atol=1e-5)
    with pytest.raises(ReadError, match="needs a slice_index"):
        read_image(tmp_path / "v.npy")
    unit = rng.random((12, 10)).astype(np.float32)
    np.savez(tmp_path / "u.npz", image=unit)
    np.testing.assert_array_equal(read_image(tmp_path / "u.npz")[..., 0], unit)  # floats in [0, 1] unchanged
    torch.save(torch.from_numpy(np.stack([unit] * 3)), tmp_path / "t.pt")  # [C, H, W]
    np.testing.assert_array_equal(read_image(tmp_path / "t.pt"), np.stack([unit] * 3, -1))


def test_pad_and_crop_keep_aspect_ratio(tmp_path):
    img = np.full((20, 40), 255, np.uint8)
    Image.fromarray(img).save(tmp_path / "wide.png")
    padded = read_image(tmp_path / "wide.png", image_size=40, fit="pad")[..., 0]
    assert padded.shape == (40, 40)
    assert padded[:9].max() == 0 and padded[-9:].max() == 0 and padded[11:29].min() > 0.999
    cropped = read_image(tmp_path / "wide.png", image_size=40, fit="crop")[..., 0]
    assert cropped.min() > 0.999
    stretched = read_image(tmp_path / "wide.png", image_size=16, fit="stretch")
    assert stretched.shape == (16, 16, 1) and stretched.min() > 0.999


def test_register_a_new_format(tmp_path):
    @register_format(".raw16")
    def read_raw16(path, frame=None):
        return np.fromfile(path, dtype="<u2").reshape(8, 8)

    try:
        arr = np.arange(64, dtype="<u2").reshape(8, 8)
        arr.tofile(tmp_path / "x.raw16")
        got = read_image(tmp_path / "x.raw16", intensity="minmax")[..., 0]
        np.testing.assert_allclose(got, arr / 63.0, atol=1e-6)
    finally:
        readers.FORMATS.pop(".raw16")


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ReadError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    data = (tmp_path / "good.png")
    Image.fromarray(np.zeros((64, 64), np.uint8) + 3).save(data)
    (tmp_path / "trunc.png").write_bytes(data.read_bytes()[:40])
    with pytest.raises(ReadError, match="trunc.png: could not read"):
        read_image(tmp_path / "trunc.png")
    raw = Path(dcm("CT_small.dcm")).read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReadError, match="trunc.dcm"):
        read_image(tmp_path / "trunc.dcm")
    np.save(tmp_path / "complex.npy", np.zeros((4, 4), np.complex64))
    with pytest.raises(ReadError, match="complex.npy: unsupported pixel dtype complex64"):
        read_image(tmp_path / "complex.npy")
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(ReadError, match="x.xyz: unsupported file type"):
        read_image(tmp_path / "x.xyz")
    with pytest.raises(ReadError, match="given but the file holds one 2-D image"):
        read_image(data, slice_index=3)
    with pytest.raises(ReadError, match="neither a preset"):
        read_image(dcm("CT_small.dcm"), window="spleen")


# ----------------------------------------------------------------------------------------------
# ImageDataset
# ----------------------------------------------------------------------------------------------
def test_image_dataset_items_and_failure_reporting(tmp_path):
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "white.png")
    rows = [
        {"identifier": "white.png", "label": "1", "_line": 2},
        {"identifier": "nope.png", "label": 0, "_line": 3},
        {"identifier": "white.png", "label": 9, "_line": 4},
        {"identifier": dcm("emri_small.dcm"), "label": 0, "slice_index": "2", "_line": 5},
    ]
    meta = tmp_path / "meta.csv"
    ds = ImageDataset(rows, meta_path=meta, image_size=16, num_classes=3, on_error="report",
                      value_range=(-1, 1))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["ok"].tolist() == [True, False, False, True]
    assert torch.all(batch["image"][0] == 1.0) and batch["label"].tolist()[0] == 1
    assert "nope.png: file not found" in batch["error"][1]
    assert "meta.csv:4" in batch["error"][2] and "outside [0, 3)" in batch["error"][2]
    assert batch["image"][3].min() >= -1 and batch["image"][3].max() <= 1
    strict = ImageDataset(rows, meta_path=meta, image_size=16)
    with pytest.raises(ReadError, match=r"meta.csv:3 \(nope.png\)"):
        strict[1]


def test_image_dataset_hooks(tmp_path):
    path = dcm("CT_small.dcm")
    rows = [{"identifier": path, "_line": 2}, {"identifier": path, "window": "lung", "_line": 3}]
    seen = []
    ds = ImageDataset(rows, image_size=32, channels=1, value_range=(0, 1), window="abdomen",
                      read_options=lambda row, i: seen.append(i) or {},
                      transform=lambda x: torch.flip(x, dims=[-1]))
    a, b = ds[0]["image"], ds[1]["image"]
    assert seen == [0, 1]
    ref = torch.from_numpy(read_image(path, window="abdomen", image_size=32)).permute(2, 0, 1)
    torch.testing.assert_close(a, torch.flip(ref, dims=[-1]))
    ref_lung = torch.from_numpy(read_image(path, window="lung", image_size=32)).permute(2, 0, 1)
    torch.testing.assert_close(b, torch.flip(ref_lung, dims=[-1]))  # the row's window wins
    random_window = ImageDataset(rows[:1], image_size=32, channels=1, read_options=lambda r, i: {"window": "bone"})
    ref_bone = torch.from_numpy(read_image(path, window="bone", image_size=32)).permute(2, 0, 1) * 2 - 1
    torch.testing.assert_close(random_window[0]["image"], ref_bone)
