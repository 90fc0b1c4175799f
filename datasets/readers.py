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
"""
from __future__ import annotations

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
    info: dict = field(default_factory=dict)


Handler = Callable[..., "RawImage | np.ndarray"]
FORMATS: dict[str, Handler] = {}


def register_format(*extensions: str) -> Callable[[Handler], Handler]:
    """Decorator: use `fn(path, frame=None)` for files ending in any of `extensions` (case-insensitive)."""
    def deco(fn: Handler) -> Handler:
        for ext in extensions:
            FORMATS[ext.lower() if ext.startswith(".") else "." + ext.lower()] = fn
        return fn
    return deco


def _is_dicom(path: Path) -> bool:
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
    if _is_dicom(Path(path)):  # DICOM files often carry no extension (IM0001, 1.2.840....)
        return FORMATS[".dcm"]
    raise ReadError(f"{path}: unsupported file type; supported extensions: {', '.join(sorted(FORMATS))}")


# ----------------------------------------------------------------------------------------------
# Format handlers
# ----------------------------------------------------------------------------------------------
@register_format(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
def read_pil(path: Path, frame: int | None = None) -> RawImage:
    from PIL import Image

    with Image.open(path) as im:
        n_frames = getattr(im, "n_frames", 1)
        if frame is not None and n_frames > 1:  # multi-page TIFF: pages are slices
            if not 0 <= frame < n_frames:
                raise ReadError(f"{path}: slice_index {frame} outside [0, {n_frames}) pages")
            im.seek(frame)
        mode = im.mode
        if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        elif mode == "1":
            im = im.convert("L")
        elif mode == "LA":
            im = im.getchannel("L")  # drop alpha
        arr = np.array(im)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    return RawImage(arr, volume=False, frame_selected=frame is not None and n_frames > 1)


@register_format(".dcm", ".dicom", ".ima")
def read_dicom(path: Path, frame: int | None = None) -> RawImage:
    import pydicom
    from pydicom.pixels import apply_rescale, pixel_array

    ds = pydicom.dcmread(path, stop_before_pixels=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError(f"{path}: DICOM file holds no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    one_frame = frame is not None and n_frames > 1
    if one_frame and not 0 <= frame < n_frames:
        raise ReadError(f"{path}: slice_index {frame} outside [0, {n_frames}) frames")
    # pixel_array decodes compressed syntaxes through the installed plug-ins and converts YBR to RGB;
    # with `index` it decodes one frame only (a 120-frame echo clip costs one frame per row).
    arr = pixel_array(ds, index=frame if one_frame else None)
    modality = str(ds.get("Modality", "") or "") or None
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    if has_rescale and ds.get("SamplesPerPixel", 1) == 1:
        arr = apply_rescale(arr, ds)  # stored values -> modality units (HU for CT)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc
        ww = ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww
        if float(ww) > 0:
            window = (float(wc), float(ww))
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    return RawImage(
        arr, volume=n_frames > 1 and not one_frame, color=color, bit_depth=bits, modality=modality,
        is_hu=modality == "CT" and has_rescale, invert=photometric == "MONOCHROME1",
        file_window=window, frame_selected=one_frame,
        info={"photometric": photometric, "frames": n_frames},
    )


@register_format(".nii", ".nii.gz", ".img", ".hdr")
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


@register_format(".mha", ".mhd", ".nrrd", ".nhdr")
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


@register_format(".npy")
def read_npy(path: Path, frame: int | None = None) -> np.ndarray:
    # allow_pickle=False: an .npy file cannot run code
    return np.load(path, allow_pickle=False, mmap_mode="r")


@register_format(".npz")
def read_npz(path: Path, frame: int | None = None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        key = "image" if "image" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            raise ReadError(f"{path}: .npz holds {keys}; store the image under the key 'image' or alone")
        return z[key]


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
    if color and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    volume = raw.volume
    if volume is None or (volume and arr.ndim == (3 if color else 2)):
        volume = arr.ndim == (4 if color else 3)
    return replace(raw, array=arr, volume=volume, color=color)


def load_raw(path: str | os.PathLike, frame: int | None = None) -> RawImage:
    """Run the handler for `path`; `frame` is passed as a hint. Volumes are cached per process."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _VOLUME_CACHE:
        _VOLUME_CACHE.move_to_end(key)
        return _VOLUME_CACHE[key]
    handler = find_handler(path)
    try:
        raw = handler(path, frame=frame)
    except ReadError:
        raise
    except Exception as e:  # truncated files, decoder errors, ...: name the file and the cause
        raise ReadError(f"{path}: could not read ({type(e).__name__}: {e})") from e
    raw = _normalise_raw(raw, path)
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


def parse_window(window) -> tuple[float, float] | None:
    """None, a preset name, (level, width), or the string 'level,width'."""
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower()
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

    auto: 8-bit data / 255 (unchanged); a requested `window` for CT data (DICOM CT in HU, or data of a
    format that records no modality and is not 8-bit); a DICOM CT without a requested window uses the
    window stored in the file if any; float data already within [0, 1] unchanged; else percentiles.
    """
    if intensity not in INTENSITY_MODES:
        raise ReadError(f"intensity {intensity!r} is not one of {INTENSITY_MODES}")
    eight_bit = x.dtype == np.uint8 or (raw.bit_depth == 8 and np.issubdtype(x.dtype, np.integer))
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():  # NaN outside the brain in some NIfTI maps: treat as background
        finite = x[np.isfinite(x)]
        x = np.nan_to_num(x, nan=finite.min() if finite.size else 0.0, posinf=finite.max() if finite.size else 0.0,
                          neginf=finite.min() if finite.size else 0.0)
    win = parse_window(window)
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


def fit_and_resize(x: torch.Tensor, image_size: int | None, fit: str = "pad") -> torch.Tensor:
    """[C, H, W] -> [C, S, S]: pad (centred, value 0) or centre-crop to a square, then resize."""
    if fit not in FIT_MODES:
        raise ReadError(f"fit {fit!r} is not one of {FIT_MODES}")
    if image_size is None:
        return x
    _, h, w = x.shape
    if fit == "pad" and h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top), value=0.0)
    elif fit == "crop" and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top:top + s, left:left + s]
    if x.shape[-2:] != (image_size, image_size):
        # antialias: large radiographs (2k x 2k) shrink without aliasing
        x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def read_image_tensor(
    path: str | os.PathLike, slice_index=None, slice_axis=None, *, window=None, intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5), channels: int | None = None, image_size: int | None = None,
    fit: str = "pad",
) -> torch.Tensor:
    """Like `read_image` but returns a torch tensor [C, H, W] (what datasets want)."""
    slice_index = parse_index(slice_index)
    axis = parse_axis(slice_axis)
    raw = load_raw(path, frame=slice_index if axis == 0 else None)
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
    fit: str = "pad",
) -> np.ndarray:
    """One 2-D image as float32 [H, W, C] in [0, 1].

    slice_index / slice_axis: which slice of a volume or multi-frame file (axis 0 = z / frames by
    default; 1 = coronal, 2 = sagittal for volumes); required for volumes, absent for 2-D images.
    window: CT window, a preset name from CT_WINDOWS or (level, width) in HU.
    intensity: 'auto' (see scale_intensity), 'window', 'percentile', 'minmax' or 'unit' (clip to [0, 1]).
    channels: None keeps 1 (grey) or 3 (RGB); an int replicates grey / converts colour.
    image_size / fit: square output of that side after padding ('pad'), centre-cropping ('crop') or
    stretching ('stretch'); None keeps the native size.
    """
    t = read_image_tensor(path, slice_index, slice_axis, window=window, intensity=intensity,
                          percentiles=percentiles, channels=channels, image_size=image_size, fit=fit)
    return t.permute(1, 2, 0).numpy()


def volume_shape(path: str | os.PathLike) -> tuple[int, ...] | None:
    """Spatial shape [D, H, W] of a volume / multi-frame file, or None for a single 2-D image."""
    path = Path(path)
    if find_handler(path) is read_dicom:  # header only: do not decode every frame
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        return (n, int(ds.Rows), int(ds.Columns)) if n > 1 else None
    raw = load_raw(path)
    if not raw.volume:
        return None
    return tuple(raw.array.shape[:3])
