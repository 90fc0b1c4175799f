"""DICOM beyond one file: series folders as volumes, DICOMDIR studies, and the file's own windows.

A *series folder* is a folder whose files (not sub-folders) are the slices of one DICOM series, as
hospitals export them. Its slices are ordered by patient position: ImagePositionPatient projected on
the normal of ImageOrientationPatient (the normal taken to point towards +L, +P or +S, whichever it is
closest to, so an axial series runs from inferior to superior like a NIfTI volume), never by file name;
InstanceNumber only when positions are missing. Axis 0 of the volume is the series' own slices.

Reading slice k reads the headers of the folder once per process (cached per folder, sorted) and then
decodes one file. Coronal / sagittal reformats (slice_axis 1 / 2) decode the whole series and orient it
like the NIfTI / MetaImage readers (LPS: [z, y, x], anterior at the top, patient right on the left).

Intensity: every slice is rescaled with its own RescaleSlope/Intercept (CT in HU); MONOCHROME1 is
inverted. Where the reader would otherwise scale each image by its own percentiles (MR, PET, CT
without any window, ...), a series gets *one* scaling for all its slices: the 0.5-99.5 % percentiles
of up to SERIES_SAMPLE_SLICES evenly spaced slices, computed once per series and process. Neighbouring
slices then keep their relative brightness (a per-slice stretch would brighten the nearly empty end
slices); the price is decoding those sample slices once, the first time a series is met.

A DICOMDIR stands for the study (or CD) it indexes: with a `series_uid` it reads that series.

File windows (`window: file`, `file:N`, `file:NAME`) go through pydicom's `apply_voi_lut` /
`apply_windowing` (VOI LUT Sequence, WindowCenter/Width with VOILUTFunction LINEAR, LINEAR_EXACT or
SIGMOID); the output is mapped to [0, 1] by the range pydicom's transform can produce.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from datasets.readers import FileWindow, RawImage, ReadError, check_pixels

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
SERIES_SAMPLE_SLICES = 8
PARALLEL_TOLERANCE = 1e-3  # 1 - |cos| between slice normals (about 2.5 degrees)
SERIES_CACHE_SIZE = 256    # folders whose sorted headers are kept per process

HEADER_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SeriesDescription",
               "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "Rows", "Columns",
               "NumberOfFrames", "SamplesPerPixel", "SOPClassUID", "StudyDescription", "PatientName"]
VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
                "VOILUTSequence", "BitsStored", "BitsAllocated", "PixelRepresentation", "RescaleSlope",
                "RescaleIntercept", "ModalityLUTSequence", "PhotometricInterpretation")


# ----------------------------------------------------------------------------------------------
# One file -> RawImage (single files and series slices alike)
# ----------------------------------------------------------------------------------------------
def dicom_raw(ds: Dataset, path, frame: int | None) -> RawImage:
    """Decode `ds` (one frame when `frame` is given) and rescale to modality units (HU for CT)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError(f"{path}: DICOM file holds no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pydicom.pixels.pixel_array(ds, index=frame)  # converts YBR to RGB; one frame with `index`
    modality = str(ds.get("Modality", "") or "") or None
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    if has_rescale and not color:
        arr = pydicom.pixels.apply_rescale(arr, ds)  # stored values -> modality units (HU for CT)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = wc[0] if isinstance(wc, MultiValue) else wc
        ww = ww[0] if isinstance(ww, MultiValue) else ww
        if float(ww) > 0:
            window = (float(wc), float(ww))
    return RawImage(
        arr, volume=n_frames > 1 and frame is None, color=color, bit_depth=bits, modality=modality,
        is_hu=modality == "CT" and has_rescale, invert=photometric == "MONOCHROME1",
        file_window=window, frame_selected=frame is not None, voi=voi_function(ds, path),
        info={"photometric": photometric, "frames": n_frames},
    )


# ----------------------------------------------------------------------------------------------
# The file's own windows (VOI LUT)
# ----------------------------------------------------------------------------------------------
def file_windows(ds: Dataset) -> list[tuple[str, int, str]]:
    """(kind, index, explanation) of every window in the file: VOI LUTs first, then centre/width pairs
    (the order in which pydicom's apply_voi_lut prefers them)."""
    out = [("lut", i, str(item.get("LUTExplanation", "") or ""))
           for i, item in enumerate(ds.get("VOILUTSequence") or [])]
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centres = ds.WindowCenter
        n = len(centres) if isinstance(centres, MultiValue) else 1
        names = ds.get("WindowCenterWidthExplanation") or []
        names = list(names) if isinstance(names, MultiValue) else [names]
        out += [("window", i, str(names[i]) if i < len(names) else "") for i in range(n)]
    return out


def voi_function(ds: Dataset, path):
    """A function (values [H, W] in modality units, FileWindow) -> [0, 1] holding only the VOI tags."""
    slim = Dataset()
    for keyword in VOI_KEYWORDS:
        if keyword in ds:
            slim[keyword] = ds[keyword]
    windows = file_windows(slim)

    def apply(x: np.ndarray, spec: FileWindow) -> np.ndarray:
        if not windows:
            raise ReadError(f"{path}: window '{spec}' asks for the file's own window, but the file stores "
                            "none (no VOI LUT Sequence, no WindowCenter/WindowWidth)")
        listing = ", ".join(f"{j}: {name or kind}" for j, (kind, _, name) in enumerate(windows))
        if isinstance(spec.which, int):
            if not 0 <= spec.which < len(windows):
                raise ReadError(f"{path}: window '{spec}': the file has {len(windows)} window(s) ({listing})")
            kind, index, _ = windows[spec.which]
        else:
            named = [w for w in windows if w[2].strip().lower() == spec.which.strip().lower()]
            if not named:
                raise ReadError(f"{path}: window '{spec}': no window of that name; the file has {listing}")
            kind, index, _ = named[0]
        with np.errstate(over="ignore"):
            if kind == "lut":
                item = slim.VOILUTSequence[index]
                n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
                values = np.rint(x).astype(np.int64)  # LUT input is integer
                y = pydicom.pixels.apply_voi_lut(values, slim, index=index, prefer_lut=True)
                reach = pydicom.pixels.apply_voi_lut(np.arange(first, first + n), slim, index=index)
            else:
                y = pydicom.pixels.apply_windowing(x.astype(np.float64), slim, index=index)
                # far below / above the window: the output limits of the transform
                reach = pydicom.pixels.apply_windowing(np.array([-1e30, 1e30]), slim, index=index)
        lo, hi = float(np.min(reach)), float(np.max(reach))
        if not hi > lo:
            raise ReadError(f"{path}: window '{spec}' maps every value to {lo}")
        return np.clip((np.asarray(y, np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    return apply


# ----------------------------------------------------------------------------------------------
# Headers and series
# ----------------------------------------------------------------------------------------------
@dataclass
class SliceHeader:
    path: Path
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance: int | None
    rows: int
    cols: int
    frames: int


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def read_header(path: Path) -> SliceHeader | None:
    """The header of one DICOM image file, or None for anything else (not DICOM, DICOMDIR, reports)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        return None
    except Exception:  # a damaged header: not usable as a slice; reading the file itself says why
        return None
    if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
        return None
    try:
        instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    return SliceHeader(
        path=Path(path), series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""), modality=str(ds.get("Modality", "") or ""),
        description=str(ds.get("SeriesDescription", "") or "").strip(),
        position=_floats(ds.get("ImagePositionPatient"), 3), orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        instance=instance, rows=int(ds.Rows), cols=int(ds.Columns), frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


@dataclass
class Series:
    uid: str
    slices: list[SliceHeader]            # sorted through-plane (axis 0)
    problem: str | None = None           # why the files are not one volume (None: they are)
    normal: np.ndarray | None = None     # unit normal the slices are ordered along (LPS)
    _limits: dict = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        return self.slices[0].description

    @property
    def modality(self) -> str:
        return self.slices[0].modality

    @property
    def num_slices(self) -> int:
        """Slices of the volume: frames of one multi-frame file, else files."""
        return self.slices[0].frames if self.multiframe else len(self.slices)

    @property
    def multiframe(self) -> bool:
        return len(self.slices) == 1 and self.slices[0].frames > 1

    def summary(self) -> str:
        n = self.num_slices
        return f"{self.uid} ({self.description or 'no description'}, {self.modality}, {n} slice{'s' * (n != 1)})"


def _normal(orientation) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def sort_series(uid: str, headers: list[SliceHeader]) -> Series:
    """Order the files of one series through-plane, or record why they are not one volume."""
    headers = sorted(headers, key=lambda h: h.path.name)  # deterministic before sorting by position
    if len(headers) == 1:
        return Series(uid, headers)
    if any(h.frames > 1 for h in headers):
        return Series(uid, headers, f"{len(headers)} multi-frame files in one series; give one file as the identifier")
    sizes = sorted({(h.rows, h.cols) for h in headers})
    if len(sizes) > 1:
        return Series(uid, headers, f"slices of different sizes {sizes}")
    if all(h.position is not None and h.orientation is not None for h in headers):
        normal = _normal(headers[0].orientation)
        normal = normal * np.sign(normal[np.argmax(np.abs(normal))])  # towards +L, +P or +S
        for h in headers[1:]:
            if 1.0 - abs(float(_normal(h.orientation) @ normal)) > PARALLEL_TOLERANCE:
                return Series(uid, headers, f"slices are not parallel ({headers[0].path.name} and {h.path.name} "
                                            "have different ImageOrientationPatient: a localizer, a multi-plane "
                                            "or a radial acquisition), so they do not form a volume")
        depth = np.array([np.asarray(h.position) @ normal for h in headers])
        order = np.argsort(depth, kind="stable")
        gaps = np.diff(depth[order])
        if np.any(gaps < 1e-4):
            k = int(np.argmin(gaps))
            return Series(uid, headers, f"{headers[order[k]].path.name} and {headers[order[k + 1]].path.name} lie "
                                        "at the same position (several echoes / time points in one series?)")
        return Series(uid, [headers[i] for i in order], normal=normal)
    if all(h.instance is not None for h in headers):
        ordered = sorted(headers, key=lambda h: h.instance)
        numbers = [h.instance for h in ordered]
        if len(set(numbers)) < len(numbers):
            return Series(uid, headers, "no ImagePositionPatient and repeated InstanceNumbers: cannot order the slices")
        return Series(uid, ordered)
    return Series(uid, headers, "neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber on every "
                                "file: cannot order the slices")


def group_series(headers: list[SliceHeader]) -> dict[str, Series]:
    by_uid: dict[str, list[SliceHeader]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    return {uid: sort_series(uid, hs) for uid, hs in by_uid.items()}


def folder_files(folder: Path) -> list[Path]:
    """Files directly inside `folder` (sub-folders are other series), hidden files and DICOMDIR skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def is_dicomdir(path: Path) -> bool:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS


def dicomdir_files(path: Path, series_uid: str | None) -> list[Path]:
    """Image files a DICOMDIR lists (only those of `series_uid` when given)."""
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(pydicom.dcmread(path))
    except Exception as e:
        raise ReadError(f"{path}: could not read the DICOMDIR ({type(e).__name__}: {e})") from e
    files = []
    for instance in fs:
        if series_uid is not None and str(getattr(instance, "SeriesInstanceUID", "")) != series_uid:
            continue
        files.append(Path(instance.path))
    return files


_SERIES_CACHE: "OrderedDict[tuple, dict[str, Series]]" = OrderedDict()


def series_index(path: Path, series_uid: str | None = None) -> dict[str, Series]:
    """{SeriesInstanceUID: Series} of a folder or a DICOMDIR; headers are read once per process."""
    path = Path(path)
    dicomdir = path.is_file()
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, series_uid if dicomdir else None)
    if key in _SERIES_CACHE:
        _SERIES_CACHE.move_to_end(key)
        return _SERIES_CACHE[key]
    files = dicomdir_files(path, series_uid) if dicomdir else folder_files(path)
    index = group_series([h for h in map(read_header, files) if h is not None])
    _SERIES_CACHE[key] = index
    while len(_SERIES_CACHE) > SERIES_CACHE_SIZE:
        _SERIES_CACHE.popitem(last=False)
    return index


def get_series(path: Path, series_uid: str | None = None) -> Series:
    """The one series of a folder / DICOMDIR (or the one `series_uid` names); a clear error otherwise."""
    series_uid = str(series_uid).strip() if series_uid not in (None, "") else None
    index = series_index(path, series_uid)
    what = "DICOMDIR" if Path(path).is_file() else "folder"
    if not index:
        where = "" if what == "DICOMDIR" else " (files directly in the folder are read, not sub-folders)"
        raise ReadError(f"{path}: no DICOM images in this {what}{where}"
                        + (f" for series_uid {series_uid}" if series_uid else ""))
    listing = "; ".join(s.summary() for s in index.values())
    if series_uid is not None:
        if series_uid not in index:
            raise ReadError(f"{path}: series_uid {series_uid} is not in this {what}; it holds {listing}")
        series = index[series_uid]
    elif len(index) > 1:
        raise ReadError(f"{path}: this {what} holds {len(index)} series; add a series_uid column to pick one: "
                        f"{listing}")
    else:
        series = next(iter(index.values()))
    if series.problem:
        raise ReadError(f"{path}: series {series.summary()}: {series.problem}")
    return series


# ----------------------------------------------------------------------------------------------
# Reading a series
# ----------------------------------------------------------------------------------------------
def _slice_values(h: SliceHeader) -> np.ndarray:
    """Decoded, rescaled values of one single-frame slice."""
    return dicom_raw(pydicom.dcmread(h.path), h.path, None).array


def _limits_function(series: Series):
    """One (lo, hi) for the whole series: percentiles of evenly spaced sample slices, computed once."""
    def limits(percentiles=(0.5, 99.5)) -> tuple[float, float]:
        key = tuple(percentiles)
        if key not in series._limits:
            n = len(series.slices)
            picks = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(n, SERIES_SAMPLE_SLICES))})
            values = []
            for i in picks:
                x = np.asarray(_slice_values(series.slices[i]), np.float32)
                step = max(1, int(np.sqrt(x.shape[0] * x.shape[1] / 65536)))
                sample = x[::step, ::step].ravel()
                values.append(sample[np.isfinite(sample)])
            lo, hi = np.percentile(np.concatenate(values), key)
            series._limits[key] = (float(lo), float(hi))
        return series._limits[key]
    return limits


_VOLUME_CACHE: "OrderedDict[tuple, RawImage]" = OrderedDict()
VOLUME_CACHE_SIZE = 2


def _lps_transform(series: Series):
    """nibabel orientation transform from the stacked series [slice, row, col] to LPS [z, y, x]."""
    import nibabel as nib

    h = series.slices[0]
    row, col = np.asarray(h.orientation[:3]), np.asarray(h.orientation[3:])
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = series.normal, col, row  # voxel axis -> LPS direction
    target = np.array([[2, 1], [1, 1], [0, 1]])  # axis 0 -> +S, axis 1 -> +P, axis 2 -> +L
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), target)


def _reformat_problem(series: Series) -> str | None:
    if series.normal is None:
        return "the slices carry no ImagePositionPatient/ImageOrientationPatient"
    if np.argmax(np.abs(series.normal)) != 2:
        plane = "sagittal" if np.argmax(np.abs(series.normal)) == 0 else "coronal"
        return f"the series is {plane}, not axial"
    return None


def series_shape(path: Path, series_uid: str | None = None) -> tuple[int, ...] | None:
    """[D, H, W] of the series (D: its own slices; H, W as the coronal/sagittal reformats see them), or
    None for a single 2-D image. Headers only."""
    import nibabel as nib

    series = get_series(path, series_uid)
    h = series.slices[0]
    if series.multiframe:
        return (h.frames, h.rows, h.cols)
    if series.num_slices == 1:
        return None
    shape = (series.num_slices, h.rows, h.cols)
    if _reformat_problem(series) is None:
        view = np.broadcast_to(np.zeros((), bool), shape)  # no memory: only the shape is transformed
        shape = nib.orientations.apply_orientation(view, _lps_transform(series)).shape
    return tuple(int(v) for v in shape)


def load_series(path: Path, frame: int | None, *, series_uid: str | None = None,
                max_pixels: int | None = None) -> RawImage:
    """RawImage of slice `frame` (that file decoded alone) or, with frame None, of the whole series
    oriented LPS [z, y, x] (radiological, like NIfTI) for coronal / sagittal reformats."""
    from datasets.readers import load_raw

    path = Path(path)
    series = get_series(path, series_uid)
    n = series.num_slices
    if series.multiframe:  # one multi-frame file (enhanced CT/MR, an ultrasound clip): its frames are slices
        return load_raw(series.slices[0].path, frame, max_pixels=max_pixels)
    h0 = series.slices[0]
    limits = _limits_function(series)
    if n == 1 or frame is not None:
        k = 0 if n == 1 and frame is None else frame
        if not 0 <= k < n:
            raise ReadError(f"{path}: slice_index {k} outside [0, {n}) slices of series {series.summary()}")
        h = series.slices[k]
        check_pixels((h.rows, h.cols), max_pixels, h.path)
        try:
            raw = dicom_raw(pydicom.dcmread(h.path), h.path, None)
        except ReadError:
            raise
        except Exception as e:
            raise ReadError(f"{h.path}: could not read ({type(e).__name__}: {e})") from e
        if raw.array.ndim == 3 and not raw.color:
            raise ReadError(f"{h.path}: a slice of series {series.uid} holds several frames")
        return replace(raw, volume=False, frame_selected=n > 1, series_limits=limits)
    problem = _reformat_problem(series)
    if problem:
        raise ReadError(f"{path}: coronal / sagittal slices need an axial series with positions; {problem} "
                        "(slice_axis 0 reads its own slices)")
    check_pixels((n, h0.rows, h0.cols), max_pixels, path)
    key = (str(path.resolve()), series.uid, tuple(str(h.path) for h in series.slices),
           tuple(os.stat(h.path).st_mtime_ns for h in series.slices))
    if key in _VOLUME_CACHE:
        _VOLUME_CACHE.move_to_end(key)
        return _VOLUME_CACHE[key]
    import nibabel as nib

    first = dicom_raw(pydicom.dcmread(h0.path), h0.path, None)
    stack = [first.array] + [_slice_values(h) for h in series.slices[1:]]
    if len({a.shape for a in stack}) > 1:
        raise ReadError(f"{path}: slices of series {series.uid} decode to different shapes")
    dtype = np.float32 if any(a.dtype.kind == "f" for a in stack) else np.result_type(*[a.dtype for a in stack])
    volume = nib.orientations.apply_orientation(np.stack(stack).astype(dtype, copy=False), _lps_transform(series))
    raw = replace(first, array=np.ascontiguousarray(volume), volume=True, frame_selected=False, radiological=True,
                  series_limits=limits)
    _VOLUME_CACHE[key] = raw
    while len(_VOLUME_CACHE) > VOLUME_CACHE_SIZE:
        _VOLUME_CACHE.popitem(last=False)
    return raw
