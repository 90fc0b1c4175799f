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


# ----------------------------------------------------------------------------------------------
# Pixel cap (checked from the header, before decoding) and memory of pad / resize
# ----------------------------------------------------------------------------------------------
def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path):
    # files whose pixel data are broken: decoding would fail with "could not read"; the cap must speak first
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(raw[:60])
    with pytest.raises(ReadError, match=r"broken.png: 120,000 pixels .* limit of 1,000"):
        read_image(tmp_path / "broken.png", max_pixels=1000)
    with pytest.raises(ReadError, match="could not read"):
        read_image(tmp_path / "broken.png")
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.Rows = ds.Columns = 4096  # the header promises 16M pixels; the data hold 16k
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(ReadError, match=r"big.dcm: 16,777,216 pixels .*limit of 1,000,000"):
        read_image(tmp_path / "big.dcm", max_pixels=1_000_000)
    with open(tmp_path / "big.npy", "wb") as f:  # an .npy header for 1e10 values and no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)})
    with pytest.raises(ReadError, match="big.npy: 10,000,000,000 pixels"):
        read_image(tmp_path / "big.npy")  # the default cap
    assert read_image(tmp_path / "a.png", max_pixels=120_000).shape == (300, 400, 1)
    assert read_image(tmp_path / "a.png", max_pixels=0).shape == (300, 400, 1)  # 0: no cap
    assert read_image(tmp_path / "a.png", max_pixels=None).shape == (300, 400, 1)


def test_compressed_bombs_are_refused_without_decompressing(tmp_path):
    import tracemalloc

    import nibabel as nib
    sitk = pytest.importorskip("SimpleITK")

    zeros = np.zeros((1500, 1500), np.float64)  # 18 MB, a few kB compressed
    np.savez_compressed(tmp_path / "bomb.npz", image=zeros)
    nib.save(nib.Nifti1Image(np.zeros((120, 120, 120), np.float32), np.eye(4)), tmp_path / "bomb.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((120, 120, 120), np.float32)), str(tmp_path / "bomb.nrrd"), True)
    del zeros
    for name in ("bomb.npz", "bomb.nii.gz", "bomb.nrrd"):
        assert (tmp_path / name).stat().st_size < 200_000
        tracemalloc.start()
        with pytest.raises(ReadError, match=f"{name}: .* exceed the limit of 100,000"):
            read_image(tmp_path / name, slice_index=0, max_pixels=100_000)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2_000_000, (name, peak)  # the data (7-18 MB) were never decompressed


def test_pad_resizes_the_long_side_first(tmp_path, monkeypatch):
    # a 1 x 60000 strip: padding it to a square first would allocate 60000^2 floats (14 GB)
    Image.fromarray(np.full((1, 60000), 255, np.uint8)).save(tmp_path / "strip.png")
    biggest = []
    for name in ("pad", "interpolate"):
        real = getattr(torch.nn.functional, name)

        def wrapped(*a, _real=real, **k):
            out = _real(*a, **k)
            biggest.append(out.numel())
            return out
        monkeypatch.setattr(torch.nn.functional, name, wrapped)
    img = read_image(tmp_path / "strip.png", image_size=64)[..., 0]
    assert max(biggest) <= 64 * 64
    assert img.shape == (64, 64)
    np.testing.assert_allclose(img[31], 1.0, atol=1e-5)  # one white row, centred
    assert np.delete(img, 31, axis=0).max() == 0.0
    tall = read_image(tmp_path / "strip.png", image_size=64, fit="stretch")
    assert tall.shape == (64, 64, 1) and tall.min() > 0.9999


# ----------------------------------------------------------------------------------------------
# Clear per-row errors: 4-D arrays, no finite values, multi-page files without slice_index
# ----------------------------------------------------------------------------------------------
def test_4d_arrays_and_nan_images_are_clear_errors(tmp_path):
    np.save(tmp_path / "four.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ReadError, match=r"four.npy: 4-D array of shape \(2, 3, 8, 8\)"):
        read_image(tmp_path / "four.npy", slice_index=0)
    np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ReadError, match="nan.npy: no finite pixel values"):
        read_image(tmp_path / "nan.npy")
    np.save(tmp_path / "inf.npy", np.full((8, 8), np.inf, np.float32))
    with pytest.raises(ReadError, match="inf.npy: no finite pixel values"):
        read_image(tmp_path / "inf.npy")
    part = np.arange(64, dtype=np.float32).reshape(8, 8)
    part[0, 0] = np.nan  # NaN background beside real values: still an image
    np.save(tmp_path / "part.npy", part)
    got = read_image(tmp_path / "part.npy", intensity="minmax")[..., 0]
    assert got[0, 0] == 0.0 and got[-1, -1] == 1.0
    # a 4-D NIfTI (an fMRI / diffusion series): refused with its shape, as nibabel reads it
    import nibabel as nib
    path = NIBABEL_DATA / "example4d.nii.gz"
    shape = nib.load(str(path)).shape
    assert len(shape) == 4 and shape[-1] > 1
    with pytest.raises(ReadError, match=rf"4-D NIfTI of shape \({shape[0]}, {shape[1]}, {shape[2]}, {shape[3]}\)"):
        read_image(path, slice_index=0)


def test_multipage_tiff_pages_are_slices(tmp_path):
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 65535, (4, 12, 10)).astype(np.uint16)
    Image.fromarray(pages[0]).save(tmp_path / "stack.tif", save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    with Image.open(tmp_path / "stack.tif") as im:  # PIL's own pages are the reference
        assert im.n_frames == 4
        ref = []
        for k in range(4):
            im.seek(k)
            ref.append(np.array(im))
    ref = np.stack(ref)
    with pytest.raises(ReadError, match="needs a slice_index"):
        read_image(tmp_path / "stack.tif")
    assert volume_shape(tmp_path / "stack.tif") == (4, 12, 10)
    for k in range(4):
        got = read_image(tmp_path / "stack.tif", slice_index=k, intensity="minmax")[..., 0]
        x = ref[k].astype(np.float64)
        np.testing.assert_allclose(got, (x - x.min()) / (x.max() - x.min()), atol=1e-5)
    col = read_image(tmp_path / "stack.tif", slice_index=5, slice_axis=2, intensity="minmax")[..., 0]
    x = ref[:, :, 5].astype(np.float64)  # pages are not oriented: no flip
    np.testing.assert_allclose(col, (x - x.min()) / (x.max() - x.min()), atol=1e-5)
    with pytest.raises(ReadError, match=r"slice_index 4 outside \[0, 4\)"):
        read_image(tmp_path / "stack.tif", slice_index=4)


# ----------------------------------------------------------------------------------------------
# Independent references: nibabel orientation, colour weights, NRRD, Analyze, colour DICOM
# ----------------------------------------------------------------------------------------------
def minmax(x):
    x = np.asarray(x, np.float64)
    return (x - x.min()) / (x.max() - x.min())


@pytest.mark.parametrize("name", ["anatomical.nii", "mni"])
def test_coronal_and_sagittal_follow_nibabel_orientation(name):
    import nibabel as nib

    if name == "mni":
        nilearn = pytest.importorskip("nilearn")
        path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    else:
        path = NIBABEL_DATA / name
    img = nib.as_closest_canonical(nib.load(str(path)))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asanyarray(img.dataobj).astype(np.float64)  # [x: towards the patient's right, y: anterior, z: superior]
    nx, ny, nz = data.shape
    for j in (ny // 3, ny // 2):
        # coronal: superior at the top (z descending down the rows), patient's right on the image's left
        # (x descending along the columns). Axis 1 counts from anterior, so index j is y = ny - 1 - j.
        expected = data[:, ny - 1 - j, :].T[::-1, ::-1]
        got = read_image(path, slice_index=j, slice_axis="coronal", intensity="minmax")[..., 0]
        np.testing.assert_allclose(got, minmax(expected), atol=1e-5)
    for i in (nx // 3, nx // 2):
        # sagittal: superior at the top, anterior on the left (y descending); index i counts from the right
        expected = data[nx - 1 - i, :, :].T[::-1, ::-1]
        got = read_image(path, slice_index=i, slice_axis="sagittal", intensity="minmax")[..., 0]
        np.testing.assert_allclose(got, minmax(expected), atol=1e-5)
    # world coordinates: the top row of a coronal slice lies above its bottom row
    top = img.affine @ [nx // 2, ny // 2, nz - 1, 1]
    bottom = img.affine @ [nx // 2, ny // 2, 0, 1]
    assert top[2] > bottom[2]


def test_colour_to_grey_uses_rec601_weights(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    grey = read_image(tmp_path / "c.png", channels=1)[..., 0]
    r, g, b = (rgb[..., i].astype(np.float64) / 255 for i in range(3))
    np.testing.assert_allclose(grey, 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-6)  # ITU-R BT.601 luma
    pil_l = np.array(Image.fromarray(rgb).convert("L")) / 255.0  # PIL's own conversion (rounded to 8 bit)
    np.testing.assert_allclose(grey, pil_l, atol=1 / 255 + 1e-6)


def test_colour_dicom_is_rgb():
    path = dcm("SC_rgb.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    np.testing.assert_allclose(read_image(path), ds.pixel_array / 255.0, atol=1e-6)
    x = ds.pixel_array.astype(np.float64) / 255
    np.testing.assert_allclose(read_image(path, channels=1)[..., 0], x @ [0.299, 0.587, 0.114], atol=1e-6)


def test_nrrd_volume_matches_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    vol = rng.integers(-1000, 2000, (6, 10, 12)).astype(np.int16)  # [z, y, x]
    image = sitk.GetImageFromArray(vol)  # identity direction: LPS already
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nrrd")))  # SimpleITK's own reading
    assert volume_shape(tmp_path / "v.nrrd") == back.shape
    for k in (0, 3, 5):
        np.testing.assert_allclose(read_image(tmp_path / "v.nrrd", k, window=(500, 3000))[..., 0],
                                   np.clip((back[k] - (500 - 1500)) / 3000, 0, 1), atol=1e-6)
    # coronal: superior at the top
    np.testing.assert_allclose(read_image(tmp_path / "v.nrrd", 4, "coronal", intensity="minmax")[..., 0],
                               minmax(back[::-1, 4, :]), atol=1e-5)


def test_analyze_volume_matches_nibabel(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(8)
    data = rng.integers(0, 3000, (9, 7, 5)).astype(np.int16)
    nib.save(nib.AnalyzeImage(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "a.img")
    assert (tmp_path / "a.hdr").is_file()
    canon = np.asanyarray(nib.as_closest_canonical(nib.load(str(tmp_path / "a.img"))).dataobj).astype(np.float64)
    for path in (tmp_path / "a.img", tmp_path / "a.hdr"):
        for k in (0, 2, 4):
            expected = canon[:, :, k].T[::-1, ::-1]  # axial, radiological
            np.testing.assert_allclose(read_image(path, k, intensity="minmax")[..., 0], minmax(expected), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# PIL modes and resizing against PIL's own conversion and resampling
# ----------------------------------------------------------------------------------------------
def pil_rgb_file(tmp_path, mode: str, ext: str, **save) -> Path:
    """A small colourful image saved in PIL `mode`; PIL must reopen it in that mode."""
    rng = np.random.default_rng(11)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    im = rgb.convert("P").convert("PA") if mode == "PA" else rgb.convert(mode)
    path = tmp_path / f"{mode}{ext}"
    im.save(path, **save)
    with Image.open(path) as back:
        assert back.mode == mode, (mode, back.mode)
    return path


@pytest.mark.parametrize("mode, ext", [("P", ".png"), ("P", ".gif"), ("PA", ".tif"), ("CMYK", ".jpg"),
                                       ("CMYK", ".tif"), ("YCbCr", ".tif"), ("LAB", ".tif")])
def test_colour_modes_are_pils_rgb(tmp_path, mode, ext):
    path = pil_rgb_file(tmp_path, mode, ext)
    with Image.open(path) as im:
        expected = np.array(im.convert("RGB")) / 255.0  # PIL's own conversion
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["1", "LA"])
def test_bilevel_and_grey_alpha_are_pils_grey(tmp_path, mode):
    path = pil_rgb_file(tmp_path, mode, ".png")
    with Image.open(path) as im:
        expected = np.array(im.convert("L")) / 255.0
    got = read_image(path)
    assert got.shape == expected.shape + (1,)
    np.testing.assert_allclose(got[..., 0], expected, atol=1e-6)


def test_transparent_palette_reads_without_warnings(tmp_path):
    import warnings

    rng = np.random.default_rng(12)
    im = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert("P")
    im.save(tmp_path / "t.png", transparency=bytes([255, 255, 255, 0, 128]))  # per-entry alpha (tRNS bytes)
    with Image.open(tmp_path / "t.png") as back:
        assert back.mode == "P" and isinstance(back.info["transparency"], bytes)
        expected = np.array(back.convert("RGBA"))[..., :3] / 255.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when such a palette is converted to RGB instead of RGBA
        np.testing.assert_allclose(read_image(tmp_path / "t.png"), expected, atol=1e-6)


def pil_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """PIL's bilinear resampling of a float image (antialiased when shrinking)."""
    return np.array(Image.fromarray(x.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def test_resize_matches_pil_bilinear(tmp_path):
    rng = np.random.default_rng(13)
    x = rng.random((60, 45)).astype(np.float32)  # floats in [0, 1]: read unchanged
    np.save(tmp_path / "x.npy", x)
    for size in (32, 12, 90):  # shrink (antialiased) and enlarge
        got = read_image(tmp_path / "x.npy", image_size=size, fit="stretch")[..., 0]
        np.testing.assert_allclose(got, np.clip(pil_resize(x, size, size), 0, 1), atol=1e-5)
    # pad: the long side to 32 (60 x 45 -> 32 x 24), centred in zeros (4 columns each side)
    got = read_image(tmp_path / "x.npy", image_size=32, fit="pad")[..., 0]
    np.testing.assert_allclose(got, np.pad(np.clip(pil_resize(x, 32, 24), 0, 1), ((0, 0), (4, 4))), atol=1e-5)
    # crop: the central 45 x 45 square (rows 7..51), then to 32; the same for columns of the wide image
    got = read_image(tmp_path / "x.npy", image_size=32, fit="crop")[..., 0]
    np.testing.assert_allclose(got, np.clip(pil_resize(x[7:52], 32, 32), 0, 1), atol=1e-5)
    np.save(tmp_path / "wide.npy", np.ascontiguousarray(x.T))
    got = read_image(tmp_path / "wide.npy", image_size=32, fit="crop")[..., 0]
    np.testing.assert_allclose(got, np.clip(pil_resize(x.T[:, 7:52], 32, 32), 0, 1), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Array shapes, the format registry and header probes (cases found by scripts/mutation.sh)
# ----------------------------------------------------------------------------------------------
def test_array_layouts_are_read_as_numpy_holds_them(tmp_path):
    rng = np.random.default_rng(14)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    for name, arr in (("lead.npy", grey[None]), ("trail.npy", grey[..., None])):  # [1, H, W], [H, W, 1]
        np.save(tmp_path / name, arr)
        np.testing.assert_allclose(read_image(tmp_path / name)[..., 0], grey / 255.0, atol=1e-6)
    np.save(tmp_path / "column.npy", grey[:, :1])  # [H, 1]: an image one pixel wide, not a 1-D array
    np.testing.assert_allclose(read_image(tmp_path / "column.npy")[..., 0], grey[:, :1] / 255.0, atol=1e-6)
    np.save(tmp_path / "mask.npy", grey > 128)  # bool: True is white
    np.testing.assert_array_equal(read_image(tmp_path / "mask.npy")[..., 0], (grey > 128).astype(np.float32))
    np.save(tmp_path / "full.npy", np.ones((4, 3), bool))  # all True: white, not a constant 0
    np.testing.assert_array_equal(read_image(tmp_path / "full.npy"), np.ones((4, 3, 1), np.float32))
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)  # alpha dropped
    np.save(tmp_path / "rgba.npy", rgba)
    np.testing.assert_allclose(read_image(tmp_path / "rgba.npy"), rgba[..., :3] / 255.0, atol=1e-6)
    frames = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)  # colour frames [D, H, W, 3]
    np.save(tmp_path / "frames.npy", frames)
    assert volume_shape(tmp_path / "frames.npy") == (2, 6, 5)
    np.testing.assert_allclose(read_image(tmp_path / "frames.npy", 1), frames[1] / 255.0, atol=1e-6)
    Image.fromarray(grey[:, :4]).save(tmp_path / "four.png")  # a grey PNG 4 pixels wide keeps 4 columns
    np.testing.assert_allclose(read_image(tmp_path / "four.png")[..., 0], grey[:, :4] / 255.0, atol=1e-6)
    for name, arr in (("line.npy", grey[0]), ("five.npy", np.zeros((2, 2, 2, 2, 2)))):
        np.save(tmp_path / name, arr)
        with pytest.raises(ReadError, match=rf"{name}: array of shape \({', '.join(map(str, arr.shape))},?\) "
                                            "is not an image or volume"):
            read_image(tmp_path / name, slice_index=0)


def test_one_slice_volumes_and_colour_stacks(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(15)
    data = rng.integers(0, 3000, (8, 6, 1)).astype(np.int16)  # [x, y, z] with one axial slice
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii")
    canon = np.asanyarray(nib.as_closest_canonical(nib.load(str(tmp_path / "one.nii"))).dataobj)
    expected = canon[:, :, 0].T[::-1, ::-1].astype(np.float64)  # radiological axial view
    got = read_image(tmp_path / "one.nii", intensity="minmax")[..., 0]  # a 2-D image: no slice_index needed
    np.testing.assert_allclose(got, minmax(expected), atol=1e-5)
    assert volume_shape(tmp_path / "one.nii") is None
    # multi-page colour TIFF: pages are RGB slices; grey pages 4 pixels wide are neither colour nor alpha
    pages = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    Image.fromarray(pages[0]).save(tmp_path / "rgb.tif", save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    np.testing.assert_allclose(read_image(tmp_path / "rgb.tif", 2), pages[2] / 255.0, atol=1e-6)
    thin = rng.integers(0, 256, (2, 6, 4), dtype=np.uint8)
    Image.fromarray(thin[0]).save(tmp_path / "thin.tif", save_all=True, append_images=[Image.fromarray(thin[1])])
    np.testing.assert_allclose(read_image(tmp_path / "thin.tif", 1)[..., 0], thin[1] / 255.0, atol=1e-6)
    # one page among several: the cap counts that page only
    assert read_image(tmp_path / "rgb.tif", 1, max_pixels=6 * 5).shape == (6, 5, 3)
    with pytest.raises(ReadError, match="exceed the limit"):
        read_image(tmp_path / "rgb.tif", 1, max_pixels=6 * 5 - 1)
    # along axis 1 the whole stack is decoded: rows of every page
    np.testing.assert_allclose(read_image(tmp_path / "rgb.tif", 2, 1), pages[:, 2] / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "thin.tif", 5, 1)[..., 0], thin[:, 5] / 255.0, atol=1e-6)


def test_single_images_are_not_volumes(tmp_path):
    rng = np.random.default_rng(16)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for name in ("a.png", "a.jpg", "a.bmp"):  # JPEG and BMP have no frame count
        Image.fromarray(rgb).save(tmp_path / name)
        assert volume_shape(tmp_path / name) is None
        assert read_image(tmp_path / name, max_pixels=30).shape == (6, 5, 3)  # exactly at the cap
        with pytest.raises(ReadError, match=f"{name}: 30 pixels .* limit of 29"):
            read_image(tmp_path / name, max_pixels=29)


def test_npz_keys(tmp_path):
    rng = np.random.default_rng(17)
    image, mask = rng.random((6, 5)).astype(np.float32), np.zeros((6, 5), np.float32)
    np.savez(tmp_path / "two.npz", mask=mask, image=image)  # 'image' is the image among several
    np.testing.assert_array_equal(read_image(tmp_path / "two.npz")[..., 0], image)
    assert readers.probe_npz(tmp_path / "two.npz") == (6, 5)  # the cap's header-only shape, of 'image'
    np.savez(tmp_path / "alone.npz", image)  # a single array under numpy's own name (arr_0)
    np.testing.assert_array_equal(read_image(tmp_path / "alone.npz")[..., 0], image)
    np.savez(tmp_path / "neither.npz", a=image, b=mask)
    with pytest.raises(ReadError, match=r"neither.npz: .npz holds \['a', 'b'\]; store the image under the key"):
        read_image(tmp_path / "neither.npz")


def test_header_probes_speak_before_broken_data(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    # .npy format 2.0 header promising 1e10 values, and no data
    with open(tmp_path / "big2.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)})
    with pytest.raises(ReadError, match="big2.npy: 10,000,000,000 pixels"):
        read_image(tmp_path / "big2.npy")
    # NRRD with a detached data file that is cut short: the header's size is refused first
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 30, 40), np.int16)), str(tmp_path / "v.nhdr"))
    raw = next(p for p in tmp_path.iterdir() if p.name.startswith("v.") and p.suffix != ".nhdr")
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(ReadError, match=r"v.nhdr: 4,800 pixels .* limit of 1,000"):
        read_image(tmp_path / "v.nhdr", 0, max_pixels=1000)
    with pytest.raises(ReadError, match="v.nhdr: SimpleITK could not read it"):
        read_image(tmp_path / "v.nhdr", 0)


def test_registered_extensions_and_probes(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FORMATS", dict(readers.FORMATS))
    monkeypatch.setattr(readers, "PROBES", dict(readers.PROBES))
    calls = []

    def probe(path, frame=None):
        calls.append(Path(path).name)
        return (6, 5)

    @register_format("ZZQ", probe=probe)  # no dot, upper case: registered as ".zzq"
    def read_zzq(path, frame=None):
        return torch.full((6, 5), 0.5)  # a handler may return a torch tensor

    assert readers.FORMATS[".zzq"] is read_zzq and readers.PROBES[read_zzq] is probe
    (tmp_path / "X.ZzQ").write_bytes(b"")
    np.testing.assert_allclose(read_image(tmp_path / "X.ZzQ")[..., 0], 0.5)
    assert calls == ["X.ZzQ"]
    (tmp_path / "azzq").write_bytes(b"")  # the extension is a suffix after a dot, not any ending
    with pytest.raises(ReadError, match=r"azzq: unsupported file type; supported extensions: .*\.dcm, \.dicom, "):
        read_image(tmp_path / "azzq")
    # the longest registered suffix wins (".a.nii" over ".nii", though ".nii" sorts after it)
    register_format(".a.nii")(read_zzq)
    (tmp_path / "scan.a.nii").write_bytes(b"")
    assert readers.find_handler(tmp_path / "scan.a.nii") is read_zzq
    assert readers.find_handler(tmp_path / "scan.nii") is readers.read_nifti
    # without an extension only a DICOM preamble makes a file DICOM
    (tmp_path / "notes").write_bytes(b"x" * 200)
    with pytest.raises(ReadError, match="notes: unsupported file type"):
        read_image(tmp_path / "notes")
    assert not readers.is_dicom_file(tmp_path / "missing") and not readers.is_dicom_file(tmp_path)


def test_scaling_edge_cases(tmp_path):
    # one bright pixel: the 0.5..99.5 percentiles coincide, so min..max is used instead
    x = np.zeros((20, 20), np.int16)
    x[3, 4] = 1000
    np.save(tmp_path / "dot.npy", x)
    np.testing.assert_array_equal(read_image(tmp_path / "dot.npy")[..., 0], (x > 0).astype(np.float32))
    np.save(tmp_path / "flat.npy", np.full((5, 4), 700, np.int16))  # constant: 0 everywhere
    np.testing.assert_array_equal(read_image(tmp_path / "flat.npy"), np.zeros((5, 4, 1), np.float32))
    # explicit percentiles reach the scaling
    y = np.random.default_rng(18).normal(size=(30, 20))
    np.save(tmp_path / "y.npy", y)
    lo, hi = np.percentile(y, (10, 90))
    np.testing.assert_allclose(read_image(tmp_path / "y.npy", intensity="percentile", percentiles=(10, 90))[..., 0],
                               np.clip((y - lo) / (hi - lo), 0, 1), atol=1e-5)
    # large images: percentiles of a strided subsample of at most 512 x 512 values (1024 x 4096: every 4th)
    big = np.random.default_rng(19).random((1024, 4096)).astype(np.float32) * 1000
    np.save(tmp_path / "big.npy", big)
    lo, hi = np.percentile(big[::4, ::4], (0.5, 99.5))
    got = read_image(tmp_path / "big.npy")[..., 0]
    np.testing.assert_allclose(got[:8, :8], np.clip((big[:8, :8] - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_channels_fit_and_window_names(tmp_path):
    rng = np.random.default_rng(20)
    grey = rng.integers(0, 256, (3, 7), dtype=np.uint8)  # 3 rows: the row count is not a channel count
    Image.fromarray(grey).save(tmp_path / "g.png")
    three = read_image(tmp_path / "g.png", channels=3)
    assert three.shape == (3, 7, 3) and np.array_equal(three[..., 0], three[..., 2])
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ReadError, match="cannot turn a 3-channel image into 4 channels"):
        read_image(tmp_path / "c.png", channels=4)
    with pytest.raises(ReadError, match=r"fit 'zoom' is not one of \('pad', 'crop', 'stretch'\)"):
        read_image(tmp_path / "c.png", image_size=8, fit="zoom")
    # a tall strip: one centred column survives the resize to 8 x 8 (never fewer than one pixel)
    Image.fromarray(np.full((200, 1), 255, np.uint8)).save(tmp_path / "tall.png")
    strip = read_image(tmp_path / "tall.png", image_size=8)[..., 0]
    np.testing.assert_allclose(strip[:, 3], 1.0, atol=1e-6)
    assert np.delete(strip, 3, axis=1).max() == 0.0
    with pytest.raises(ReadError, match=r"needs a slice_index \(and optionally slice_axis\) in its metadata row"):
        read_image(NIBABEL_DATA / "anatomical.nii")
    # the file's own windows print as they are written, and read back
    for spelling in ("file", "file:1", "file:BRAIN"):
        window = readers.parse_window(spelling)
        assert str(window) == spelling and readers.parse_window(str(window)) == window


def test_pixel_cap_counts_colour_once_and_every_voxel(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(21)
    for name, shape in (("rgb.npy", (6, 5, 3)), ("rgba.npy", (6, 5, 4))):  # colour counts H x W
        np.save(tmp_path / name, rng.integers(0, 256, shape, dtype=np.uint8))
        assert read_image(tmp_path / name, max_pixels=30).shape == (6, 5, 3)
        with pytest.raises(ReadError, match=f"{name}: 30 pixels"):
            read_image(tmp_path / name, max_pixels=29)
    # a grey volume 3 voxels wide is not colour: all 60 voxels count, also when read again from the cache
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 1000, (4, 5, 3)).astype(np.int16)), str(tmp_path / "v.nrrd"))
    with pytest.raises(ReadError, match=r"v.nrrd: 60 pixels \(shape \(4, 5, 3\)\)"):
        read_image(tmp_path / "v.nrrd", 1, max_pixels=59)
    assert read_image(tmp_path / "v.nrrd", 1).shape == (5, 3, 1)  # decoded and cached
    with pytest.raises(ReadError, match=r"v.nrrd: 60 pixels"):
        read_image(tmp_path / "v.nrrd", 1, max_pixels=59)
    # a DICOMDIR's series is capped too
    dicomdir = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    uid = str(pydicom.dcmread(next((dicomdir.parent / "77654033" / "CT2").iterdir()), stop_before_pixels=True)
              .SeriesInstanceUID)
    assert read_image(dicomdir, 0, series_uid=uid, max_pixels=16 * 16).shape == (16, 16, 1)
    with pytest.raises(ReadError, match="exceed the limit"):
        read_image(dicomdir, 0, series_uid=uid, max_pixels=16 * 16 - 1)
    # formats without a header probe are checked once decoded
    torch.save(torch.rand(6, 5), tmp_path / "t.pt")
    with pytest.raises(ReadError, match=r"t.pt: 30 pixels .* limit of 29"):
        read_image(tmp_path / "t.pt", max_pixels=29)


def test_volume_cache_tells_files_apart(tmp_path):
    rng = np.random.default_rng(22)
    a, b = (rng.integers(0, 4000, (3, 6, 5)).astype(np.int16) for _ in range(2))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    stamp = (tmp_path / "a.npy").stat().st_mtime_ns
    os.utime(tmp_path / "b.npy", ns=(stamp, stamp))  # same size and time stamp: only the name differs
    for name, vol in (("a.npy", a), ("b.npy", b), ("a.npy", a)):
        x = vol[1].astype(np.float64)
        np.testing.assert_allclose(read_image(tmp_path / name, 1, intensity="minmax")[..., 0],
                                   (x - x.min()) / (x.max() - x.min()), atol=1e-6)


def test_window_and_index_spellings(tmp_path):
    assert readers.parse_window("40:80") == readers.parse_window("40,80") == (40.0, 80.0)
    assert readers.parse_window("40,1") == (40.0, 1.0)  # narrow but valid
    for bad in ("40,0", "40,-5"):
        with pytest.raises(ReadError, match="window width must be positive, got"):
            readers.parse_window(bad)
    with pytest.raises(ReadError, match=r"window 'spleen' is neither a preset \(brain, subdural, "):
        readers.parse_window("spleen")
    with pytest.raises(ReadError, match="slice_index 'abc' is not an integer"):
        readers.parse_index("abc")
    with pytest.raises(ReadError, match=r"window 'file:': name the file's window after 'file:'"):
        readers.parse_window("file:")
    dicomdir = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    with pytest.raises(ReadError, match=r"DICOMDIR: a DICOM series of shape \(4, 16, 16\) needs a slice_index "
                                        r"\(and optionally slice_axis\) in its metadata row"):
        read_image(dicomdir, series_uid=str(pydicom.dcmread(
            next((dicomdir.parent / "77654033" / "CT2").iterdir()), stop_before_pixels=True).SeriesInstanceUID))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ReadError, match="pipe.png: not a file"):
        read_image(fifo)
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ReadError, match=r"trunc.png: could not read \([A-Za-z]+Error: "):
        read_image(tmp_path / "trunc.png")


def test_intensity_modes_follow_their_formulas(tmp_path, monkeypatch):
    rng = np.random.default_rng(23)
    # intensity='window' windows any data, also MR; the formula is clip((x - (level - width / 2)) / width)
    path = dcm("MR_small.dcm")
    ds = pydicom.dcmread(path)
    mr = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_image(path, window=(600, 800), intensity="window")[..., 0],
                               np.clip((mr - 200) / 800, 0, 1), atol=1e-6)
    with pytest.raises(ReadError, match="MR_small.dcm: intensity 'window' needs a window"):
        read_image(path, intensity="window")
    with pytest.raises(ReadError, match=r"intensity 'gamma' is not one of \('auto'"):
        read_image(path, intensity="gamma")
    # the file's own window under intensity='window' too, and inverted for MONOCHROME1
    ct = pydicom.dcmread(dcm("CT_small.dcm"))
    ct.WindowCenter, ct.WindowWidth = 40, 400
    ct.save_as(tmp_path / "m2.dcm")
    ct.PhotometricInterpretation = "MONOCHROME1"
    ct.save_as(tmp_path / "m1.dcm")
    m2 = read_image(tmp_path / "m2.dcm", window="file")
    assert m2.dtype == np.float32
    np.testing.assert_array_equal(read_image(tmp_path / "m2.dcm", window="file", intensity="window"), m2)
    np.testing.assert_allclose(read_image(tmp_path / "m1.dcm", window="file"), 1.0 - m2, atol=1e-6)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "z.png")
    with pytest.raises(ReadError, match="z.png: window 'file' asks for the file's own window, which only DICOM "
                                        "files record"):
        read_image(tmp_path / "z.png", window="file")
    # unit: 8-bit / 255, anything else clipped to [0, 1]
    u8 = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "u8.png")
    np.testing.assert_allclose(read_image(tmp_path / "u8.png", intensity="unit")[..., 0], u8 / 255.0, atol=1e-6)
    lo, hi = np.percentile(u8, (0.5, 99.5))  # 'percentile' also for 8-bit data
    np.testing.assert_allclose(read_image(tmp_path / "u8.png", intensity="percentile")[..., 0],
                               np.clip((u8 - lo) / (hi - lo), 0, 1), atol=1e-5)
    f = rng.uniform(-0.5, 1.5, (5, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", f)
    np.testing.assert_allclose(read_image(tmp_path / "f.npy", intensity="unit")[..., 0], np.clip(f, 0, 1), atol=1e-6)
    # auto: floats within [0, 1], ends included, are kept; floats beyond are scaled by percentiles
    g = rng.random((6, 5)).astype(np.float32)
    g[0, 0], g[0, 1] = 0.0, 1.0
    np.save(tmp_path / "g.npy", g)
    np.testing.assert_array_equal(read_image(tmp_path / "g.npy")[..., 0], g)
    np.save(tmp_path / "g15.npy", g * 1.5)
    lo, hi = np.percentile(g * 1.5, (0.5, 99.5))
    np.testing.assert_allclose(read_image(tmp_path / "g15.npy")[..., 0], np.clip((g * 1.5 - lo) / (hi - lo), 0, 1),
                               atol=1e-5)
    lo, hi = np.percentile(g * 1.5, (10, 90))  # percentiles reach 'auto' too
    np.testing.assert_allclose(read_image(tmp_path / "g15.npy", percentiles=(10, 90))[..., 0],
                               np.clip((g * 1.5 - lo) / (hi - lo), 0, 1), atol=1e-5)
    # NaN and -inf become the smallest finite value, +inf the largest
    h = np.array([[np.nan, 10.0, 12.0], [14.0, np.inf, -np.inf]], np.float32)
    np.save(tmp_path / "h.npy", h)
    np.testing.assert_allclose(read_image(tmp_path / "h.npy", intensity="minmax")[..., 0],
                               [[0.0, 0.0, 0.5], [1.0, 1.0, 0.0]], atol=1e-6)
    # a handler's bit depth: 8 stored bits in a wider integer type are divided by 255
    monkeypatch.setattr(readers, "FORMATS", dict(readers.FORMATS))

    @register_format(".u8in16")
    def read_u8in16(p, frame=None):
        return readers.RawImage(u8.astype(np.uint16), bit_depth=8)

    (tmp_path / "x.u8in16").write_bytes(b"")
    np.testing.assert_allclose(read_image(tmp_path / "x.u8in16")[..., 0], u8 / 255.0, atol=1e-6)
    # one scaling for a whole series: the handler's (lo, hi); a constant series is 0
    v = rng.integers(100, 300, (5, 4)).astype(np.int16)
    limits = {"s": (50.0, 450.0)}

    @register_format(".series")
    def read_series(p, frame=None):
        return readers.RawImage(torch.from_numpy(v), modality="CT", series_limits=lambda: limits["s"])

    (tmp_path / "x.series").write_bytes(b"")
    np.testing.assert_allclose(read_image(tmp_path / "x.series")[..., 0], (v - 50) / 400, atol=1e-6)
    limits["s"] = (7.0, 7.0)
    np.testing.assert_array_equal(read_image(tmp_path / "x.series"), np.zeros((5, 4, 1), np.float32))


def test_odd_slices_and_axis_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FORMATS", dict(readers.FORMATS))

    @register_format(".two")
    def read_two(p, frame=None):  # two channels that are not colour
        return readers.RawImage(np.zeros((4, 5, 2), np.float32), volume=False, color=False)

    (tmp_path / "x.two").write_bytes(b"")
    with pytest.raises(ReadError, match=r"x.two: slice of shape \(4, 5, 2\) is neither grey nor RGB"):
        read_image(tmp_path / "x.two")
    with pytest.raises(ReadError, match=r"slice_axis 'diagonal' is not one of 0, 1, 2 or \['axial'"):
        readers.parse_axis("diagonal")
    with pytest.raises(ReadError, match="slice_axis 5 is not one of 0, 1, 2"):
        readers.parse_axis(5)
    with pytest.raises(ReadError, match=r"anatomical.nii: a volume of shape \(25, 41, 33\) needs a slice_index"):
        read_image(NIBABEL_DATA / "anatomical.nii")
    # read_image_tensor's own defaults: native size, channels as stored, 'auto' intensity, 'pad'
    u8 = np.random.default_rng(24).integers(0, 256, (5, 4), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "u8.png")
    np.testing.assert_allclose(readers.read_image_tensor(tmp_path / "u8.png")[0].numpy(), u8 / 255.0, atol=1e-6)
    assert readers.read_image_tensor(tmp_path / "u8.png", image_size=8).shape == (1, 8, 8)
