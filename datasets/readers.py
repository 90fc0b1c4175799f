"""The one image reader: any supported file -> one 2-D float image [H, W, C] in [0, 1].

Reading happens in four steps, each in one function, so a change of preprocessing has one place:
  1. a *format handler* (chosen by file extension, see FORMATS) returns the raw values plus a little
     metadata (`RawImage`: bit depth, modality, whether values are Hounsfield units, ...);
  2. `select_slice` picks one 2-D slice of a volume / multi-frame file (`slice_index`, `slice_axis`);
  3. `scale_intensity` maps the values to [0, 1]: CT window (level/width or a preset), 8-bit / 255,
     robust percentile scaling for everything else;
  4. `fit_and_resize` and `to_channels` give a square image with the model's channel count.

Adding a format is one function and one decorator line:

    from datasets.readers import register_format

    @register_format(".foo")
    def read_foo(path, frame=None):
        return np.fromfile(path, dtype=np.uint16).reshape(512, 512)   # or a RawImage

Handlers may return a bare numpy array (2-D grey, [H, W, 3|4] colour, or [D, H, W] volume) or a
`RawImage`. `frame` is a hint: the through-plane slice the caller wants; a handler that can read a
single frame cheaply may return just that frame and set `frame_selected=True`, others ignore it.
`register_format(..., probe=fn)` adds a header-only size check: `fn(path, frame)` returns the shape the
handler will decode, so an oversized file is refused (`max_pixels`) before anything is decoded.

A folder holding one DICOM series, or a DICOMDIR, is read as a volume by `datasets.dicom`.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.metadata import whole_number


class ReadError(ValueError):
    """An image could not be read or does not fit the request; the message names the file and problem."""


# ----------------------------------------------------------------------------------------------
# What a handler returns
# ----------------------------------------------------------------------------------------------
@dataclass
class RawImage:
    array: np.ndarray                   # [H, W], [H, W, C], [D, H, W] or [D, H, W, C]; raw values
    volume: bool | None = None          # axis 0 is a through-plane axis (None: decided from the shape)
    color: bool | None = None           # last axis holds colour channels (None: decided from the shape)
    bit_depth: int | None = None        # stored bits (8 means "divide by 255"); None: from the dtype
    modality: str | None = None         # DICOM Modality (CT, MR, US, ...) when the format records it
    is_hu: bool = False                 # values are Hounsfield units (rescaled CT)
    invert: bool = False                # MONOCHROME1: high values are dark
    file_window: tuple[float, float] | None = None  # (level, width) recorded in the file
    radiological: bool = False          # volume laid out [z, y, x] with z inferior->superior
    frame_selected: bool = False        # the handler already returned the requested frame
    voi: Callable | None = None         # voi(values, FileWindow) -> [0, 1]: the file's own windows (DICOM)
    series_limits: Callable | None = None  # () -> (lo, hi): one intensity scaling for a whole series
    info: dict = field(default_factory=dict)


Handler = Callable[..., "RawImage | np.ndarray"]
Probe = Callable[[Path, "int | None"], "tuple[int, ...] | None"]
FORMATS: dict[str, Handler] = {}
PROBES: dict[Handler, Probe] = {}

# Pixels decoded for one row: a 2-D image, the one slice read from a volume, or a whole volume when it
# must be read whole (coronal / sagittal slices, formats without single-slice access). Large enough for
# a 1024-slice 512 x 512 CT; a limit, not a target. None or 0: no limit.
DEFAULT_MAX_PIXELS = 1 << 28


def register_format(*extensions: str, probe: Probe | None = None) -> Callable[[Handler], Handler]:
    """Decorator: use `fn(path, frame=None)` for files ending in any of `extensions` (case-insensitive).
    `probe(path, frame)`, optional, returns the shape `fn` will decode, read from the header only."""
    def deco(fn: Handler) -> Handler:
        for ext in extensions:
            FORMATS[ext.lower() if ext.startswith(".") else "." + ext.lower()] = fn
        if probe is not None:
            PROBES[fn] = probe
        return fn
    return deco


def pixel_count(shape: Sequence[int], color: bool | None = None) -> int:
    """Pixels (voxels) of an array shape; a trailing colour axis (3 or 4) is not counted."""
    shape = tuple(int(n) for n in shape)
    if color or (color is None and len(shape) >= 3 and shape[-1] in (3, 4)):
        shape = shape[:-1]
    return math.prod(shape)


def check_pixels(shape: Sequence[int], max_pixels: int | None, path, color: bool | None = None) -> None:
    """Refuse an image / volume of more than `max_pixels` pixels (None or 0: no limit)."""
    if not max_pixels:
        return
    n = pixel_count(shape, color)
    if n > max_pixels:
        raise ReadError(f"{path}: {n:,} pixels (shape {tuple(int(v) for v in shape)}) exceed the limit of "
                        f"{int(max_pixels):,} per row (max_pixels; raise it, or 0 for no limit)")


def is_dicom_file(path: Path) -> bool:
    """The file starts with a DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def find_handler(path: str | os.PathLike) -> Handler:
    """The handler for `path`: longest registered suffix (so `.nii.gz` beats `.gz`); DICOM by content."""
    name = Path(path).name.lower()
    matches = [ext for ext in FORMATS if name.endswith(ext)]
    if matches:
        return FORMATS[max(matches, key=len)]
    if is_dicom_file(Path(path)):  # DICOM files often carry no extension (IM0001, 1.2.840....)
        return FORMATS[".dcm"]
    raise ReadError(f"{path}: unsupported file type; supported extensions: {', '.join(sorted(FORMATS))}")


# ----------------------------------------------------------------------------------------------
# Format handlers
# ----------------------------------------------------------------------------------------------
def _pil_page(im) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "LA":
        im = im.getchannel("L")  # drop alpha
    arr = np.array(im)
    return arr[..., :3] if arr.ndim == 3 and arr.shape[-1] == 4 else arr  # drop alpha


def probe_pil(path: Path, frame: int | None = None) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        n_frames = getattr(im, "n_frames", 1)
        w, h = im.size
    return (h, w) if n_frames == 1 or frame is not None else (n_frames, h, w)


@register_format(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", probe=probe_pil)
def read_pil(path: Path, frame: int | None = None) -> RawImage:
    from PIL import Image

    with Image.open(path) as im:
        n_frames = getattr(im, "n_frames", 1)
        if n_frames == 1:
            return RawImage(_pil_page(im), volume=False)
        # multi-page TIFF (or an animation): pages are slices along axis 0
        if frame is not None:
            if not 0 <= frame < n_frames:
                raise ReadError(f"{path}: slice_index {frame} outside [0, {n_frames}) pages")
            im.seek(frame)
            return RawImage(_pil_page(im), volume=False, frame_selected=True)
        pages = []
        for k in range(n_frames):
            im.seek(k)
            pages.append(_pil_page(im))
    if len({(p.shape, p.dtype) for p in pages}) > 1:
        raise ReadError(f"{path}: its {n_frames} pages differ in size or type; read them one by one "
                        "with slice_index (axis 0)")
    return RawImage(np.stack(pages), volume=True)


def probe_dicom(path: Path, frame: int | None = None) -> tuple[int, ...] | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        return None  # no image; the handler says so
    n = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    return (rows, cols) if n == 1 or frame is not None else (n, rows, cols)


@register_format(".dcm", ".dicom", ".ima", probe=probe_dicom)
def read_dicom(path: Path, frame: int | None = None) -> RawImage:
    import pydicom

    from datasets.dicom import dicom_raw

    ds = pydicom.dcmread(path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    one_frame = frame is not None and n_frames > 1
    if one_frame and not 0 <= frame < n_frames:
        raise ReadError(f"{path}: slice_index {frame} outside [0, {n_frames}) frames")
    # pixel_array decodes compressed syntaxes through the installed plug-ins and converts YBR to RGB;
    # with `index` it decodes one frame only (a 120-frame echo clip costs one frame per row).
    return dicom_raw(ds, path, frame if one_frame else None)


def probe_nifti(path: Path, frame: int | None = None) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(nib.load(str(path)).header.get_data_shape())  # header only; the data stay on disk


@register_format(".nii", ".nii.gz", ".img", ".hdr", probe=probe_nifti)
def read_nifti(path: Path, frame: int | None = None) -> RawImage:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: x to the right, y anterior, z superior
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise ReadError(f"{path}: {data.ndim}-D NIfTI of shape {data.shape}; split the 4-D series into "
                        "3-D volumes first (one 2-D slice per row is read from a 3-D volume)")
    if data.ndim == 2:
        return RawImage(data.T[::-1, ::-1].copy(), volume=False)
    # [x, y, z] (RAS) -> [z, y, x] with y flipped (anterior at the top) and x flipped (patient right on
    # the image left): the radiological view, the same layout as an LPS-oriented DICOM/MetaImage.
    vol = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    return RawImage(vol, volume=True, color=False, radiological=True)


def probe_sitk(path: Path, frame: int | None = None) -> tuple[int, ...] | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # header only
    except RuntimeError:
        return None  # the handler reports the error
    return tuple(reversed(reader.GetSize()))


@register_format(".mha", ".mhd", ".nrrd", ".nhdr", probe=probe_sitk)
def read_sitk(path: Path, frame: int | None = None) -> RawImage:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ReadError(f"{path}: SimpleITK could not read it: {str(e).strip().splitlines()[-1]}") from None
    ncomp = img.GetNumberOfComponentsPerPixel()
    radiological = False
    if img.GetDimension() == 3 and img.GetSize()[2] > 1:
        img = sitk.DICOMOrient(img, "LPS")  # array [z, y, x]: anterior at the top, patient right on the left
        radiological = True
    arr = sitk.GetArrayFromImage(img)  # [z, y, x(, c)] or [y, x(, c)]
    if ncomp == 1 and arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if ncomp > 1 and arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    volume = arr.ndim == (4 if ncomp > 1 else 3)
    return RawImage(arr, volume=volume, color=ncomp > 1, radiological=radiological)


def _npy_header_shape(f) -> tuple[int, ...] | None:
    """Shape from an .npy header (the file object is left after the header; nothing else is read)."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    return None if read is None else tuple(read(f)[0])


def probe_npy(path: Path, frame: int | None = None) -> tuple[int, ...] | None:
    try:
        with open(path, "rb") as f:
            return _npy_header_shape(f)
    except ValueError:
        return None  # not an .npy header: np.load says what is wrong


def _npz_key(keys: list[str], path) -> str:
    if "image" in keys:
        return "image"
    if len(keys) == 1:
        return keys[0]
    raise ReadError(f"{path}: .npz holds {keys}; store the image under the key 'image' or alone")


def probe_npz(path: Path, frame: int | None = None) -> tuple[int, ...] | None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            with zf.open(members[_npz_key(list(members), path)]) as f:  # decompresses the header only
                return _npy_header_shape(f)
    except (zipfile.BadZipFile, KeyError, ValueError):
        return None


@register_format(".npy", probe=probe_npy)
def read_npy(path: Path, frame: int | None = None) -> np.ndarray:
    # allow_pickle=False: an .npy file cannot run code
    return np.load(path, allow_pickle=False, mmap_mode="r")


@register_format(".npz", probe=probe_npz)
def read_npz(path: Path, frame: int | None = None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[_npz_key(list(z.keys()), path)]


@register_format(".pt", ".pth")
def read_pt(path: Path, frame: int | None = None) -> np.ndarray:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "image" in obj:
        obj = obj["image"]
    if not isinstance(obj, torch.Tensor):
        raise ReadError(f"{path}: holds a {type(obj).__name__}; expected a tensor (or a dict with 'image')")
    t = obj.detach()
    # torch convention [C, H, W] with C in (1, 3, 4) -> [H, W, C]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


# ----------------------------------------------------------------------------------------------
# Step 1: load (with a small per-process cache of volumes, since slice rows of one volume come together)
# ----------------------------------------------------------------------------------------------
_VOLUME_CACHE: "OrderedDict[tuple, RawImage]" = OrderedDict()
VOLUME_CACHE_SIZE = 2


def _normalise_raw(raw: RawImage | np.ndarray, path: Path) -> RawImage:
    if not isinstance(raw, RawImage):
        raw = RawImage(np.asarray(raw))
    arr = raw.array
    if isinstance(arr, torch.Tensor):
        arr = arr.numpy()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ReadError(f"{path}: unsupported pixel dtype {arr.dtype}; expected integers or floats")
    # drop leading/trailing singleton axes beyond 2-D (e.g. [1, H, W] arrays, [H, W, 1] PNGs)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 2 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim < 2 or arr.ndim > 4 or min(arr.shape[:2]) < 1:
        raise ReadError(f"{path}: array of shape {tuple(raw.array.shape)} is not an image or volume")
    color = raw.color
    if color is None:
        color = arr.ndim in (3, 4) and arr.shape[-1] in (3, 4) and not (arr.ndim == 3 and raw.volume)
    if arr.ndim == 4 and not color:
        raise ReadError(f"{path}: 4-D array of shape {tuple(raw.array.shape)}; expected a 2-D image [H, W], "
                        "colour [H, W, 3], a volume [D, H, W] or colour frames [D, H, W, 3]")
    if color and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    volume = raw.volume
    if volume is None or (volume and arr.ndim == (3 if color else 2)):
        volume = arr.ndim == (4 if color else 3)
    return replace(raw, array=arr, volume=volume, color=color)


def load_raw(
    path: str | os.PathLike, frame: int | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    series_uid: str | None = None,
) -> RawImage:
    """Run the handler for `path` (a file, a DICOM series folder or a DICOMDIR); `frame` is a hint.
    The size is checked against `max_pixels` from the header before decoding where the format allows,
    and on the decoded array always. Volumes are cached per process."""
    from datasets import dicom

    path = Path(path)
    if not path.exists():
        raise ReadError(f"{path}: file not found")
    if path.is_dir():
        return dicom.load_series(path, frame, series_uid=series_uid, max_pixels=max_pixels)
    if not path.is_file():
        raise ReadError(f"{path}: not a file")
    handler = find_handler(path)
    if handler is read_dicom and dicom.is_dicomdir(path):
        return dicom.load_series(path, frame, series_uid=series_uid, max_pixels=max_pixels)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _VOLUME_CACHE:
        _VOLUME_CACHE.move_to_end(key)
        raw = _VOLUME_CACHE[key]
        check_pixels(raw.array.shape, max_pixels, path, raw.color)
        return raw
    probe = PROBES.get(handler)
    if probe is not None and max_pixels:
        try:
            shape = probe(path, frame)
        except ReadError:
            raise
        except Exception:  # an unreadable header: the handler names the problem
            shape = None
        if shape:
            check_pixels(shape, max_pixels, path)
    try:
        raw = handler(path, frame=frame)
    except ReadError:
        raise
    except Exception as e:  # truncated files, decoder errors, ...: name the file and the cause
        raise ReadError(f"{path}: could not read ({type(e).__name__}: {e})") from e
    raw = _normalise_raw(raw, path)
    check_pixels(raw.array.shape, max_pixels, path, raw.color)  # formats without a header probe
    if raw.volume and not raw.frame_selected:
        _VOLUME_CACHE[key] = raw
        while len(_VOLUME_CACHE) > VOLUME_CACHE_SIZE:
            _VOLUME_CACHE.popitem(last=False)
    return raw


# ----------------------------------------------------------------------------------------------
# Step 2: one 2-D slice
# ----------------------------------------------------------------------------------------------
AXIS_NAMES = {"z": 0, "axial": 0, "frame": 0, "frames": 0, "y": 1, "coronal": 1, "x": 2, "sagittal": 2}


def parse_axis(value) -> int:
    """slice_axis as 0 (through-plane: z / frames), 1 (coronal / y) or 2 (sagittal / x)."""
    if value is None:
        return 0
    if isinstance(value, str):
        key = value.strip().lower()
        if key in AXIS_NAMES:
            return AXIS_NAMES[key]
        value = key
    try:
        axis = whole_number(value)
    except ValueError:
        raise ReadError(f"slice_axis {value!r} is not one of 0, 1, 2 or {sorted(AXIS_NAMES)}") from None
    if axis not in (0, 1, 2):
        raise ReadError(f"slice_axis {axis} is not one of 0, 1, 2")
    return axis


def parse_index(value) -> int | None:
    if value is None:
        return None
    try:
        return whole_number(value)
    except ValueError:
        raise ReadError(f"slice_index {value!r} is not an integer") from None


def select_slice(raw: RawImage, slice_index: int | None, slice_axis: int, path) -> np.ndarray:
    """[H, W] or [H, W, C] from a 2-D image (index must be absent or 0) or a volume (index required)."""
    arr = raw.array
    if raw.frame_selected or not raw.volume:
        if slice_index not in (None, 0) and not raw.frame_selected:
            raise ReadError(f"{path}: slice_index {slice_index} given but the file holds one 2-D image "
                            f"of shape {tuple(arr.shape)}")
        return arr
    if slice_index is None:
        raise ReadError(f"{path}: a volume of shape {tuple(arr.shape)} needs a slice_index "
                        "(and optionally slice_axis) in its metadata row")
    n = arr.shape[slice_axis]
    if not 0 <= slice_index < n:
        raise ReadError(f"{path}: slice_index {slice_index} outside [0, {n}) along axis {slice_axis} "
                        f"of a volume of shape {tuple(arr.shape)}")
    out = np.take(arr, slice_index, axis=slice_axis)
    if raw.radiological and slice_axis != 0:
        out = out[::-1]  # coronal / sagittal slices: superior at the top
    return out


# ----------------------------------------------------------------------------------------------
# Step 3: intensity -> [0, 1]
# ----------------------------------------------------------------------------------------------
# (level, width) in HU; common radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40, 80),
    "subdural": (75, 215),
    "stroke": (40, 40),
    "temporal_bone": (600, 2800),
    "soft_tissue": (50, 350),
    "mediastinum": (50, 350),
    "lung": (-600, 1500),
    "abdomen": (40, 400),
    "liver": (30, 150),
    "bone": (400, 1800),
}
INTENSITY_MODES = ("auto", "window", "percentile", "minmax", "unit")


@dataclass(frozen=True)
class FileWindow:
    """The window stored in the file (DICOM VOI LUT Sequence or WindowCenter/Width, via pydicom's
    apply_voi_lut): `which` is an index into the file's windows (VOI LUTs first, then centre/width
    pairs; 0 is the one pydicom applies by default) or an explanation such as 'BRAIN'."""
    which: int | str = 0

    def __str__(self) -> str:
        return "file" if self.which == 0 else f"file:{self.which}"


def parse_window(window) -> "tuple[float, float] | FileWindow | None":
    """None, a preset name, (level, width), the string 'level,width', or the file's own window:
    'file' (the first), 'file:N' (the N-th) or 'file:NAME' (by its explanation, e.g. 'file:BRAIN')."""
    if window is None or isinstance(window, FileWindow):
        return window
    if isinstance(window, str):
        key = window.strip().lower()
        if key == "file":
            return FileWindow(0)
        if key.startswith("file:"):
            which = window.strip()[5:].strip()
            if not which:
                raise ReadError(f"window {window!r}: name the file's window after 'file:' (an index or its name)")
            return FileWindow(int(which) if which.isdigit() else which)
        if key in CT_WINDOWS:
            return CT_WINDOWS[key]
        parts = key.replace(":", ",").split(",")
        if len(parts) != 2:
            raise ReadError(f"window {window!r} is neither a preset ({', '.join(CT_WINDOWS)}) nor 'level,width'")
        window = parts
    level, width = (float(v) for v in window)
    if width <= 0:
        raise ReadError(f"window width must be positive, got {width}")
    return level, width


def apply_window(x: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return np.clip((x - lo) / width, 0.0, 1.0)


def robust_scale(x: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """Map the p_lo..p_hi percentile range to [0, 1] (clipped). A constant image becomes 0."""
    # percentiles of a strided subsample: at most ~256k values, enough for robust limits and fast
    step = max(1, int(np.sqrt(x.shape[0] * x.shape[1] / 262144)))
    lo, hi = np.percentile(x[::step, ::step], percentiles)
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
        if not hi > lo:
            return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def scale_intensity(
    x: np.ndarray, raw: RawImage, window=None, intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5), path=None,
) -> np.ndarray:
    """Raw slice values -> float32 in [0, 1].

    auto: a file window (`window='file'`, 'file:N', 'file:NAME') through pydicom's apply_voi_lut, for
    any modality; 8-bit data / 255 (unchanged); a requested `window` for CT data (DICOM CT in HU, or
    data of a format that records no modality and is not 8-bit); a DICOM CT without a requested window
    uses the window stored in the file if any; float data already within [0, 1] unchanged; a DICOM
    series: one scaling for the whole series (`raw.series_limits`); else percentiles of the slice.
    """
    if intensity not in INTENSITY_MODES:
        raise ReadError(f"intensity {intensity!r} is not one of {INTENSITY_MODES}")
    eight_bit = x.dtype == np.uint8 or (raw.bit_depth == 8 and np.issubdtype(x.dtype, np.integer))
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():  # NaN outside the brain in some NIfTI maps: treat as background
        finite = x[np.isfinite(x)]
        if not finite.size:
            raise ReadError(f"{path}: no finite pixel values (all NaN or infinite) in the image of shape "
                            f"{tuple(x.shape)}")
        x = np.nan_to_num(x, nan=finite.min(), posinf=finite.max(), neginf=finite.min())
    win = parse_window(window)
    if isinstance(win, FileWindow) and intensity in ("auto", "window"):
        if raw.voi is None:
            raise ReadError(f"{path}: window {window!r} asks for the file's own window, which only DICOM "
                            "files record")
        out = raw.voi(x, win).astype(np.float32, copy=False)
        return 1.0 - out if raw.invert else out
    if intensity == "window":
        if win is None:
            raise ReadError(f"{path}: intensity 'window' needs a window (preset or level,width)")
        out = apply_window(x, *win)
    elif intensity == "percentile":
        out = robust_scale(x, percentiles)
    elif intensity == "minmax":
        out = robust_scale(x, (0.0, 100.0))
    elif intensity == "unit":
        out = np.clip(x / 255.0 if eight_bit else x, 0.0, 1.0)
    elif eight_bit:
        out = x / 255.0
    else:
        ct_like = raw.is_hu or (raw.modality is None)
        if win is not None and ct_like:
            out = apply_window(x, *win)
        elif raw.is_hu and raw.file_window is not None:
            out = apply_window(x, *raw.file_window)
        elif np.issubdtype(raw.array.dtype, np.floating) and x.min() >= 0.0 and x.max() <= 1.0:
            out = x.copy()  # never hand out (and later clamp in place) a view of a memory-mapped file
        elif raw.series_limits is not None:
            lo, hi = raw.series_limits()
            out = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
        else:
            out = robust_scale(x, percentiles)
    out = out.astype(np.float32, copy=False)
    return 1.0 - out if raw.invert else out


# ----------------------------------------------------------------------------------------------
# Step 4: channels and geometry
# ----------------------------------------------------------------------------------------------
def to_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """[C, H, W] -> [channels, H, W]; grey is replicated, colour -> grey by luminance (Rec. 601)."""
    if channels is None or x.shape[0] == channels:
        return x
    if x.shape[0] == 1:
        return x.expand(channels, -1, -1).contiguous()
    if channels == 1 and x.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)
        return (x * weights[:, None, None]).sum(0, keepdim=True)
    raise ReadError(f"cannot turn a {x.shape[0]}-channel image into {channels} channels")


FIT_MODES = ("pad", "crop", "stretch")


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    # antialias: large radiographs (2k x 2k) shrink without aliasing
    return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def fit_and_resize(x: torch.Tensor, image_size: int | None, fit: str = "pad") -> torch.Tensor:
    """[C, H, W] -> [C, S, S]: pad (centred, value 0) or centre-crop to a square, or stretch.

    pad resizes the long side to S first and pads afterwards, so memory never grows with the square of
    the long side (a 1 x 60000 strip stays a strip until it is S wide)."""
    if fit not in FIT_MODES:
        raise ReadError(f"fit {fit!r} is not one of {FIT_MODES}")
    if image_size is None:
        return x
    _, h, w = x.shape
    if fit == "pad":
        scale = image_size / max(h, w)
        nh, nw = max(1, min(image_size, round(h * scale))), max(1, min(image_size, round(w * scale)))
        x = _resize(x, nh, nw)
        top, left = (image_size - nh) // 2, (image_size - nw) // 2
        x = F.pad(x, (left, image_size - nw - left, top, image_size - nh - top), value=0.0)
    else:
        if fit == "crop" and h != w:
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            x = x[:, top:top + s, left:left + s]
        x = _resize(x, image_size, image_size)
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def read_image_tensor(
    path: str | os.PathLike, slice_index=None, slice_axis=None, *, window=None, intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5), channels: int | None = None, image_size: int | None = None,
    fit: str = "pad", max_pixels: int | None = DEFAULT_MAX_PIXELS, series_uid: str | None = None,
) -> torch.Tensor:
    """Like `read_image` but returns a torch tensor [C, H, W] (what datasets want)."""
    slice_index = parse_index(slice_index)
    axis = parse_axis(slice_axis)
    if slice_index is None and _is_series(Path(path)):  # say so from the headers, before decoding a series
        shape = volume_shape(path, series_uid)
        if shape is not None:
            raise ReadError(f"{path}: a DICOM series of shape {shape} needs a slice_index "
                            "(and optionally slice_axis) in its metadata row")
    raw = load_raw(path, frame=slice_index if axis == 0 else None, max_pixels=max_pixels, series_uid=series_uid)
    x = select_slice(raw, slice_index, axis, path)
    if x.ndim == 3 and not raw.color:
        raise ReadError(f"{path}: slice of shape {tuple(x.shape)} is neither grey nor RGB")
    x = scale_intensity(np.ascontiguousarray(x), raw, window, intensity, percentiles, path)
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # [C, H, W]
    # resize before replicating grey channels: a third of the work on large radiographs
    return to_channels(fit_and_resize(t, image_size, fit), channels).contiguous()


def read_image(
    path: str | os.PathLike, slice_index=None, slice_axis=None, *, window=None, intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5), channels: int | None = None, image_size: int | None = None,
    fit: str = "pad", max_pixels: int | None = DEFAULT_MAX_PIXELS, series_uid: str | None = None,
) -> np.ndarray:
    """One 2-D image as float32 [H, W, C] in [0, 1].

    path: an image file, a volume, a folder holding one DICOM series, or a DICOMDIR.
    slice_index / slice_axis: which slice of a volume or multi-frame file (axis 0 = z / frames / the
    series' own slices by default; 1 = coronal, 2 = sagittal for volumes); required for volumes, absent
    for 2-D images.
    window: CT window, a preset name from CT_WINDOWS or (level, width) in HU; or the file's own window
    ('file', 'file:N', 'file:NAME'; DICOM, any modality).
    intensity: 'auto' (see scale_intensity), 'window', 'percentile', 'minmax' or 'unit' (clip to [0, 1]).
    channels: None keeps 1 (grey) or 3 (RGB); an int replicates grey / converts colour.
    image_size / fit: square output of that side after padding ('pad'), centre-cropping ('crop') or
    stretching ('stretch'); None keeps the native size.
    max_pixels: refuse a row that would decode more pixels (checked from the header where possible);
    None or 0: no limit.
    series_uid: which series of a folder / DICOMDIR holding several (SeriesInstanceUID).
    """
    t = read_image_tensor(path, slice_index, slice_axis, window=window, intensity=intensity,
                          percentiles=percentiles, channels=channels, image_size=image_size, fit=fit,
                          max_pixels=max_pixels, series_uid=series_uid)
    return t.permute(1, 2, 0).numpy()


def _is_series(path: Path) -> bool:
    """A DICOM series folder or a DICOMDIR (read by datasets.dicom)."""
    from datasets import dicom

    if path.is_dir():
        return True
    return path.is_file() and find_handler(path) is read_dicom and dicom.is_dicomdir(path)


def volume_shape(path: str | os.PathLike, series_uid: str | None = None) -> tuple[int, ...] | None:
    """Spatial shape [D, H, W] of a volume / multi-frame file / DICOM series, or None for one 2-D image."""
    from datasets import dicom

    path = Path(path)
    if _is_series(path):
        return dicom.series_shape(path, series_uid)  # headers only
    handler = find_handler(path)
    if handler in (read_dicom, read_pil):  # header only: do not decode every frame / page
        shape = PROBES[handler](path, None)
        return shape if shape is not None and len(shape) == 3 else None
    raw = load_raw(path)
    if not raw.volume:
        return None
    return tuple(raw.array.shape[:3])
