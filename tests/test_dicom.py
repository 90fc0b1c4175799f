"""DICOM series folders, DICOMDIR and the file's own windows (datasets/dicom.py through datasets/readers.py).

Real data: pydicom's `dicomdirtests` (CT and MR series folders, a DICOMDIR, mixed and radial folders).
Synthetic series: written here with pydicom from nilearn's MNI152 template, with shuffled file names and
scrambled InstanceNumbers, so that only patient positions can give the right order. Expected values come
from the files themselves (pydicom), the source volume, or the DICOM standard's formulas.
"""
import random
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from datasets import dicom
from datasets.image_dataset import ImageDataset
from datasets.readers import ReadError, read_image, volume_shape

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
MNI = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def write_series(folder: Path, volume: np.ndarray, *, modality: str = "CT", patient: str = "P1",
                 study_uid: str | None = None, series_uid: str | None = None, description: str = "AX",
                 spacing: float = 2.0, seed: int = 0, slopes=None, positions: bool = True,
                 photometric: str = "MONOCHROME2", orientation=(1, 0, 0, 0, 1, 0),
                 extra=None) -> tuple[str, list[Path]]:
    """Write `volume` [D, H, W] (stored values, int16) as one file per slice, axial LPS (row k at
    z = k * spacing), shuffled names and InstanceNumbers. Returns (series uid, file of each slice k)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    numbers = list(range(1, len(volume) + 1))
    rng.shuffle(numbers)
    files = []
    for k, image in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study_uid, series_uid
        ds.Modality, ds.SeriesDescription, ds.InstanceNumber = modality, description, numbers[k]
        if positions:
            ds.ImagePositionPatient = [-90.0, -120.0, k * spacing]
            ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        slope, intercept = slopes[k] if slopes is not None else (1.0, -1024.0 if modality == "CT" else 0.0)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(image, dtype="<i2").tobytes()
        path = folder / f"{rng.getrandbits(40):010x}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return series_uid, files


@pytest.fixture(scope="module")
def mni_lps():
    """The MNI152 template (uint8) as an LPS [z, y, x] volume (z inferior->superior, anterior at the
    top, patient right on the left), from nibabel's canonical RAS array; every 4th voxel."""
    import nibabel as nib

    ras = np.asanyarray(nib.as_closest_canonical(nib.load(str(MNI))).dataobj)[::4, ::4, ::4]  # [x R+, y A+, z S+]
    return np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1]).astype(np.int16)


@pytest.fixture(scope="module")
def mni_series(tmp_path_factory, mni_lps):
    folder = tmp_path_factory.mktemp("series") / "mni_ct"
    # stored = HU + 1024; a CT window in HU then sees the template's values 0..255
    uid, files = write_series(folder, mni_lps + 1024, description="MNI axial")
    return folder, uid, files


def window01(hu, level, width):
    return np.clip((hu - (level - width / 2)) / width, 0, 1)


# ----------------------------------------------------------------------------------------------
# A series folder is a volume
# ----------------------------------------------------------------------------------------------
def test_slice_k_is_the_k_th_files_own_image(mni_series, mni_lps):
    folder, uid, files = mni_series
    names = sorted(p.name for p in files)
    assert [p.name for p in files] != names  # the file names do not give the order
    # the order by ImagePositionPatient z, from pydicom directly
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    assert volume_shape(folder) == mni_lps.shape
    for k in (0, 7, len(files) // 2, len(files) - 1):
        got = read_image(folder, k, window=(128, 256))
        np.testing.assert_array_equal(got, read_image(by_z[k], window=(128, 256)))  # the file's own image
        np.testing.assert_allclose(got[..., 0], window01(mni_lps[k].astype(float), 128, 256), atol=1e-6)
        ds = pydicom.dcmread(by_z[k])
        raw = dicom.load_series(folder, k)
        np.testing.assert_array_equal(raw.array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    with pytest.raises(ReadError, match="needs a slice_index"):
        read_image(folder)
    with pytest.raises(ReadError, match=r"slice_index 99 outside \[0, "):
        read_image(folder, 99)


def test_reformats_match_the_nifti_source(mni_series):
    # Coronal / sagittal slices of the series are oriented like the NIfTI reader's (tested against nibabel
    # in test_readers): the same template through two different paths.
    folder, _, _ = mni_series
    shape = volume_shape(folder)
    for axis in (1, 2):
        for j in (shape[axis] // 3, shape[axis] // 2):
            got = read_image(folder, j, axis, window=(128, 256))[..., 0]
            ref = read_image(MNI, 4 * j, axis, intensity="unit")[..., 0] * 255  # uint8 template / 255
            np.testing.assert_allclose(got, window01(ref[::4, ::4], 128, 256), atol=1e-4)


def test_reformats_of_a_mirrored_acquisition_are_oriented(tmp_path):
    # rows run towards the patient's right (ImageOrientationPatient -1, 0, 0 / 0, 1, 0): each file holds the
    # mirror image; axis 0 gives the files as stored, the reformats are oriented like every other volume.
    # Random values: the MNI template is left-right symmetric and would hide a mirrored reformat.
    lps = np.random.default_rng(4).integers(0, 2000, (6, 7, 9)).astype(np.int16)
    write_series(tmp_path / "standard", lps)
    write_series(tmp_path / "mirrored", lps[:, :, ::-1], orientation=(-1, 0, 0, 0, 1, 0))
    np.testing.assert_allclose(read_image(tmp_path / "mirrored", 5, window=(0, 4000))[..., 0],
                               window01(lps[5, :, ::-1] - 1024.0, 0, 4000), atol=1e-6)
    assert volume_shape(tmp_path / "mirrored") == volume_shape(tmp_path / "standard") == lps.shape
    for axis, j in ((1, 3), (2, 2)):
        np.testing.assert_array_equal(read_image(tmp_path / "mirrored", j, axis, window=(0, 4000)),
                                      read_image(tmp_path / "standard", j, axis, window=(0, 4000)))
    # coronal: superior at the top, patient right on the left (LPS x ascending)
    np.testing.assert_allclose(read_image(tmp_path / "mirrored", 3, 1, window=(0, 4000))[..., 0],
                               window01(lps[::-1, 3, :] - 1024.0, 0, 4000), atol=1e-6)


def test_instance_number_orders_a_series_without_positions(tmp_path):
    vol = np.arange(5)[:, None, None] * 100 + np.zeros((5, 6, 6), np.int16)
    _, files = write_series(tmp_path / "s", vol, positions=False)
    by_number = sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    for k in range(5):
        np.testing.assert_array_equal(read_image(tmp_path / "s", k, window=(0, 2000)),
                                      read_image(by_number[k], window=(0, 2000)))


def test_rescale_per_slice_monochrome1_and_one_scaling_per_series(tmp_path, mni_lps):
    # each slice stores its values with its own slope/intercept: HU must still equal the source
    vol = mni_lps[8:14].astype(np.float64)
    slopes = [(s, i) for s, i in zip((1.0, 0.5, 2.0, 1.0, 0.25, 1.0), (-1024, -500, 0, 10, -3, 7))]
    stored = np.stack([np.round((v - i) / s) for v, (s, i) in zip(vol, slopes)]).astype(np.int16)
    vol = np.stack([x * s + i for x, (s, i) in zip(stored.astype(np.float64), slopes)])  # HU after rounding
    write_series(tmp_path / "ct", stored, slopes=slopes)
    for k in range(6):
        np.testing.assert_allclose(read_image(tmp_path / "ct", k, window=(100, 300))[..., 0],
                                   window01(vol[k], 100, 300), atol=1e-6)
    # MONOCHROME1: high values dark
    write_series(tmp_path / "inv", stored, slopes=slopes, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(tmp_path / "inv", 3, window=(100, 300))[..., 0],
                               1 - window01(vol[3], 100, 300), atol=1e-6)
    # MR: slice 1 is half as bright as slice 0. One scaling for the series keeps that; a per-slice
    # percentile stretch would make both look the same.
    base = np.linspace(0, 1000, 64 * 64).reshape(64, 64)
    write_series(tmp_path / "mr", np.stack([base, base / 2, base / 4]).astype(np.int16), modality="MR")
    a, b, c = (read_image(tmp_path / "mr", k)[..., 0] for k in range(3))
    assert a.max() > 0.95
    np.testing.assert_allclose(b, a / 2, atol=0.01)
    np.testing.assert_allclose(c, a / 4, atol=0.01)


def test_a_folder_of_two_series_names_both(tmp_path, mni_lps):
    uid_a, _ = write_series(tmp_path / "mixed", mni_lps[:4] + 1024, description="axial stack")
    uid_b, _ = write_series(tmp_path / "mixed", mni_lps[:1] + 1024, description="localizer", seed=1)
    with pytest.raises(ReadError) as e:
        read_image(tmp_path / "mixed", 0)
    message = str(e.value)
    assert uid_a in message and uid_b in message and "axial stack" in message and "4 slices" in message
    assert "series_uid" in message
    np.testing.assert_allclose(read_image(tmp_path / "mixed", 2, series_uid=uid_a, window=(128, 256))[..., 0],
                               window01(mni_lps[2].astype(float), 128, 256), atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "mixed", series_uid=uid_b, window=(128, 256))[..., 0],
                               window01(mni_lps[0].astype(float), 128, 256), atol=1e-6)
    with pytest.raises(ReadError, match="series_uid 1.2.3 is not in this folder"):
        read_image(tmp_path / "mixed", 0, series_uid="1.2.3")
    # through ImageDataset, the row's series_uid column picks (SeriesInstanceUID as written by prepare too)
    rows = [{"identifier": "mixed", "slice_index": 2, "series_uid": uid_a, "_line": 2},
            {"identifier": "mixed", "slice_index": "0", "SeriesInstanceUID": uid_b, "_line": 3},
            {"identifier": "mixed", "slice_index": 0, "_line": 4}]
    ds = ImageDataset(rows, meta_path=tmp_path / "m.csv", image_size=8, channels=1, value_range=(0, 1),
                      window=(128, 256), on_error="report")
    assert [ds[i]["ok"] for i in range(3)] == [True, True, False]
    assert uid_a in ds[2]["error"] and uid_b in ds[2]["error"]


def test_pydicom_series_folders_mixed_radial_and_localizer():
    mr2 = DICOMDIR_TESTS / "98892003" / "MR2"  # two tri-plane pilot series and a localizer
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in mr2.iterdir()}
    with pytest.raises(ReadError) as e:
        read_image(mr2, 0)
    assert len(uids) == 3 and all(uid in str(e.value) for uid in uids)
    pilot = next(u for u in uids if u.endswith(".136"))
    with pytest.raises(ReadError, match="not parallel"):  # a tri-plane pilot is no volume
        read_image(mr2, 0, series_uid=pilot)
    with pytest.raises(ReadError, match="not parallel"):  # radial MR angiography
        read_image(DICOMDIR_TESTS / "98892003" / "MR700", 0)
    with pytest.raises(ReadError, match="not parallel"):  # two orthogonal CT scouts
        read_image(DICOMDIR_TESTS / "98892001" / "CT2N", 0)
    # a real CT series: positions descend with InstanceNumber; slice 0 is the most inferior
    ct = DICOMDIR_TESTS / "98892001" / "CT5N"
    by_z = sorted(ct.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k in range(5):
        np.testing.assert_array_equal(read_image(ct, k, window="abdomen"), read_image(by_z[k], window="abdomen"))


def test_dicomdir_with_series_uid():
    ct2 = DICOMDIR_TESTS / "77654033" / "CT2"
    uid = str(pydicom.dcmread(next(ct2.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    via_dir = [read_image(DICOMDIR_TESTS / "DICOMDIR", k, series_uid=uid, window="brain") for k in range(4)]
    for k in range(4):
        np.testing.assert_array_equal(via_dir[k], read_image(ct2, k, window="brain"))
    assert volume_shape(DICOMDIR_TESTS / "DICOMDIR", series_uid=uid) == (4, 16, 16)
    with pytest.raises(ReadError, match="DICOMDIR holds 13 series"):
        read_image(DICOMDIR_TESTS / "DICOMDIR", 0)


def test_slice_k_of_a_300_slice_series_decodes_one_slice(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_series(tmp_path / "long", rng.integers(0, 2000, (300, 8, 8)).astype(np.int16))
    write_series(tmp_path / "mr", rng.integers(0, 2000, (20, 8, 8)).astype(np.int16), modality="MR")
    decodes, headers = [], []
    real_decode, real_header = pydicom.pixels.pixel_array, dicom.read_header
    monkeypatch.setattr(pydicom.pixels, "pixel_array", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(dicom, "read_header", lambda p: headers.append(p) or real_header(p))
    read_image(tmp_path / "long", 150, window="abdomen")
    assert len(decodes) == 1 and len(headers) == 300
    read_image(tmp_path / "long", 7, window="abdomen")
    assert len(decodes) == 2 and len(headers) == 300  # the sorted headers are cached per folder
    # non-CT: the first row of a series also decodes the sample slices of its one intensity scaling
    decodes.clear()
    read_image(tmp_path / "mr", 10)
    assert len(decodes) == 1 + dicom.SERIES_SAMPLE_SLICES
    read_image(tmp_path / "mr", 11)
    assert len(decodes) == 2 + dicom.SERIES_SAMPLE_SLICES


def test_series_pixel_cap(mni_series):
    folder, _, _ = mni_series
    d, h, w = volume_shape(folder)
    assert read_image(folder, 0, max_pixels=h * w).shape[:2] == (h, w)
    with pytest.raises(ReadError, match="exceed the limit"):
        read_image(folder, 0, max_pixels=h * w - 1)
    with pytest.raises(ReadError, match="exceed the limit"):  # a reformat decodes the whole series
        read_image(folder, 0, 1, max_pixels=h * w * 2)


# ----------------------------------------------------------------------------------------------
# The file's own windows (VOI LUT)
# ----------------------------------------------------------------------------------------------
def ct_with_windows(tmp_path, function=None) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = [40, 400], [80, 1500]
    ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
    if function:
        ds.VOILUTFunction = function
    path = tmp_path / f"ct_{function}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("function", [None, "LINEAR_EXACT", "SIGMOID"])
def test_file_windows_follow_the_standard_and_pydicom(tmp_path, function):
    path = ct_with_windows(tmp_path, function)
    ds = pydicom.dcmread(path)
    hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype(np.float64)
    for spec, (c, w) in (("file", (40, 80)), ("file:0", (40, 80)), ("file:1", (400, 1500)),
                         ("file:BRAIN", (40, 80)), ("file:bone", (400, 1500))):
        got = read_image(path, window=spec)[..., 0]
        # DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3: the window functions, to [0, 1]
        if function is None:  # LINEAR
            expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        elif function == "LINEAR_EXACT":
            expected = np.clip((hu - c) / w + 0.5, 0, 1)
        else:
            expected = 1 / (1 + np.exp(-4 * (hu - c) / w))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        if function != "SIGMOID":  # pydicom's own output spans the full range on this image
            y = pydicom.pixels.apply_voi_lut(hu, ds, index=1 if c == 400 else 0)
            np.testing.assert_allclose(got, (y - y.min()) / (y.max() - y.min()), atol=1e-5)
    # a row's explicit window still wins; presets stay
    np.testing.assert_allclose(read_image(path, window="lung")[..., 0], window01(hu, -600, 1500), atol=1e-5)
    with pytest.raises(ReadError, match="file:7.*2 window"):
        read_image(path, window="file:7")
    with pytest.raises(ReadError, match="no window of that name.*BRAIN"):
        read_image(path, window="file:LIVER")


def test_voi_lut_sequence_and_mr_windows():
    path = get_testdata_file("vlut_04.dcm")  # a VOI LUT Sequence, 8-bit input, 16-bit output
    ds = pydicom.dcmread(path)
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, np.float64)
    y = pydicom.pixels.apply_voi_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(read_image(path, window="file")[..., 0], (y - lut.min()) / (lut.max() - lut.min()),
                               atol=1e-6)
    mr = get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")  # an MR with WINDOW1 / WINDOW2
    ds = pydicom.dcmread(mr)
    y = pydicom.pixels.apply_windowing(pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype(float), ds, index=1)
    bits = int(ds.BitsStored)
    lo, hi = (0, 2 ** bits - 1) if ds.PixelRepresentation == 0 else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    np.testing.assert_allclose(read_image(mr, window="file:WINDOW2")[..., 0], (y - lo) / (hi - lo), atol=1e-5)
    with pytest.raises(ReadError, match="stores none"):
        read_image(get_testdata_file("CT_small.dcm"), window="file")
    with pytest.raises(ReadError, match="only DICOM"):
        read_image(MNI, 90, window="file")


def test_file_window_per_row_and_per_series_slice(tmp_path, mni_lps):
    path = ct_with_windows(tmp_path)
    rows = [{"identifier": str(path), "window": "file:BONE", "_line": 2}, {"identifier": str(path), "_line": 3}]
    ds = ImageDataset(rows, image_size=None, channels=1, value_range=(0, 1), window="brain")
    np.testing.assert_array_equal(ds[0]["image"][0].numpy(), read_image(path, window="file:1")[..., 0])
    np.testing.assert_array_equal(ds[1]["image"][0].numpy(), read_image(path, window="brain")[..., 0])
    # a series slice uses its own file's windows
    write_series(tmp_path / "s", mni_lps[:3] + 1024,
                 extra={"WindowCenter": 100, "WindowWidth": 201, "VOILUTFunction": "LINEAR_EXACT"})
    np.testing.assert_allclose(read_image(tmp_path / "s", 1, window="file")[..., 0],
                               np.clip((mni_lps[1] - 100) / 201 + 0.5, 0, 1), atol=1e-5)
