"""Grey and multi-channel images (data.channels != 3): what the torch backend reads, and how.

Which files (`extensions`):
- channels 3: the RGB formats of `decode.FORMATS` (unchanged);
- channels 1: the same formats by `decode.decode_grey`'s rules (8 bits per sample, colour images to
  luma), and `.npy` arrays;
- channels N (2, 4, 5, ...): `.npy` arrays and `.tif` / `.tiff` files read by tifffile.

Array layout (`read_array`): a `.npy` holds (H, W, C) with C = data.channels, or (H, W) for one
channel; a channel-first (C, H, W) array is refused in one line naming the file (store
`np.moveaxis(a, 0, -1)`). A TIFF's first series (tifffile) holds the Y and X axes and, for more
than one channel, one more axis (samples, channels or pages) of C values, in any order. A single
2-D array is one channel.

Values (`pixel_scale`): uint8 are divided by 255 and uint16 by 65535 (the dtype's maximum), so
both read in [0, 1]; float16/32/64 are taken as stored (they are not clipped: data.mean / data.std,
or `simmim scan --stats`, put them on a common scale); a NaN or infinity is refused. Other dtypes
(int32, int64, bool, ...) have no agreed range and are refused: store uint8, uint16 or float.

Views (`array_view`): the crop box and flip of `augment.training_view` or the evaluation view of
`augment.eval_geometry`, the same geometry as the RGB path; the crop is resized in float32 by
torch's antialiased bilinear interpolation (`torch.nn.functional.interpolate(..., antialias=True)`,
the kernel torchvision's tensor `resize` uses), and normalised per channel, (x - mean) / std, in
the worker. A grey image file takes the RGB path's PIL operations on mode L instead (`folder`).
The torch backend hands these runs' batches over as normalised float32 (B, C, S, S).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import tifffile
import torch

from .augment import Augmentation, eval_geometry, training_view
from .decode import MAX_PIXELS, DecodeError, check_image, decode_grey, decode_rgb, file_kind

ARRAY_EXTENSIONS = frozenset({".npy"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def extensions(channels: int, rgb: frozenset[str]) -> frozenset[str]:
    """The file name extensions a run of `channels` reads (module docstring); `rgb`: the RGB ones."""
    if channels == 3:
        return rgb
    return rgb | ARRAY_EXTENSIONS if channels == 1 else ARRAY_EXTENSIONS | TIFF_EXTENSIONS


def is_array_file(path: str | os.PathLike, channels: int) -> bool:
    """Whether `path` is read as an array (`read_array`) rather than an image (PIL)."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix in ARRAY_EXTENSIONS or (suffix in TIFF_EXTENSIONS and channels not in (1, 3))


def pixel_scale(dtype: np.dtype) -> float:
    """What a value is divided by to read in [0, 1]: the maximum of uint8 / uint16, 1 for floats."""
    dtype = np.dtype(dtype)
    if dtype in SCALES:
        return SCALES[dtype]
    if dtype.kind == "f":
        return 1.0
    raise DecodeError(f"{dtype} pixels have no agreed range; store uint8, uint16 or float")


def read_array(path: str | os.PathLike, channels: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The (H, W, C) array of a .npy or TIFF file (C = channels), as stored (uint8, uint16 or
    float), by the module's rules. DecodeError (one line) for a file that breaks one."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DecodeError(f"not a regular file ({file_kind(path)})")
        if os.path.splitext(path)[1].lower() in ARRAY_EXTENSIONS:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            a = _channels_last(a, None, channels, max_pixels)
        else:
            a = _read_tiff(path, channels, max_pixels)
        scale = pixel_scale(a.dtype)
        a = np.array(a, order="C")  # read into memory (a .npy is memory-mapped until here), writable
    except (DecodeError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file; named in one line
        if isinstance(e, (OSError, ValueError)) and os.path.exists(path) and os.path.getsize(path) == 0:
            raise DecodeError("zero bytes") from None
        raise DecodeError(f"{type(e).__name__}: {e}".splitlines()[0][:200]) from None
    if scale == 1.0 and not np.isfinite(a).all():
        raise DecodeError("holds NaN or infinite values")
    return a


def _read_tiff(path, channels: int, max_pixels: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        if "Y" not in axes or "X" not in axes:
            raise DecodeError(f"TIFF series of axes {axes} {shape} has no Y and X axes")
        _check_pixels(shape[axes.index("Y")], shape[axes.index("X")], max_pixels)
        return _channels_last(series.asarray(), axes, channels, max_pixels)


def _channels_last(a: np.ndarray, axes: str | None, channels: int, max_pixels: int) -> np.ndarray:
    """(H, W, C) view of a 2-D or 3-D array; `axes` (tifffile's letters) places Y and X, else the
    array is taken as (H, W[, C])."""
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim != 3:
        raise DecodeError(f"array of shape {a.shape}: store (height, width, channels)")
    elif axes is not None:
        a = np.moveaxis(a, (axes.index("Y"), axes.index("X")), (0, 1))
    elif a.shape[2] != channels and a.shape[0] == channels:
        raise DecodeError(f"array of shape {a.shape} is channels-first: store (height, width, channels), "
                          f"e.g. np.moveaxis(a, 0, -1)")
    if a.shape[2] != channels:
        raise DecodeError(f"{a.shape[2]} channel(s) (shape {a.shape} as (height, width, channels)), "
                          f"data.channels is {channels}")
    _check_pixels(a.shape[0], a.shape[1], max_pixels)
    return a


def _check_pixels(h: int, w: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise DecodeError(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (data.max_pixels, --max-pixels)")
    if w < 1 or h < 1:
        raise DecodeError(f"empty image ({w}x{h})")


def read_pixels(path: str | os.PathLike, channels: int, max_pixels: int = MAX_PIXELS):
    """A sample of a data.channels != 3 run: (array (H, W, C), scale) for an array file, else the
    grey PIL image (mode L) of an image file. DecodeError (one line) for a bad file."""
    if is_array_file(path, channels):
        a = read_array(path, channels, max_pixels)
        return a, pixel_scale(a.dtype)
    if channels != 1:
        raise DecodeError(f"data.channels={channels} reads .npy and .tif/.tiff arrays, not "
                          f"{Path(path).suffix or 'this file'}")
    return decode_grey(path, max_pixels)


def pixels_of(path: str | os.PathLike, channels: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float]:
    """(values (H, W, C), scale) of any sample (`channels` 3: `decode.decode_rgb`'s RGB): what
    `simmim scan --stats` measures, value / scale in the loader's units."""
    if channels == 3:
        return np.asarray(decode_rgb(path, max_pixels)), 255.0
    got = read_pixels(path, channels, max_pixels)
    return got if isinstance(got, tuple) else (np.asarray(got)[:, :, None], 255.0)


def check_file(path: str | os.PathLike, channels: int, max_pixels: int = MAX_PIXELS
               ) -> tuple[str | None, tuple[int, int]]:
    """`decode.check_image` for a run of `channels`: (None, (width, height)) if the sample reads,
    else (one-line reason, (0, 0))."""
    if channels == 3 or not is_array_file(path, channels):
        if channels not in (1, 3):
            return f"data.channels={channels} reads .npy and .tif/.tiff arrays, not {Path(path).suffix}", (0, 0)
        return check_image(path, max_pixels, grey=channels == 1)
    try:
        a = read_array(path, channels, max_pixels)
    except DecodeError as e:
        return str(e), (0, 0)
    except Exception as e:  # noqa: BLE001 - e.g. a file deleted meanwhile
        return f"{type(e).__name__}: {e}".splitlines()[0][:200], (0, 0)
    return None, (a.shape[1], a.shape[0])


def array_view(a: np.ndarray, scale: float, aug: Augmentation, train: bool, crop_ratio: float, rng,
               mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The training view (crop box and flip from `rng`, `augment.training_view`) or the evaluation
    view of `a` (H, W, C), as normalised float32 (C, S, S): values / scale, resized by torch's
    antialiased bilinear interpolation, then (x - mean[c]) / std[c]."""
    h, w, size = a.shape[0], a.shape[1], aug.size
    x = torch.from_numpy(a).permute(2, 0, 1)  # (C, H, W), a view
    if train:
        left, top, cw, ch, flip = training_view(w, h, aug, rng)
        view = _resize(x[:, top:top + ch, left:left + cw], scale, (size, size))
        view = view.flip(-1) if flip else view
    else:
        rw, rh, left, top = eval_geometry(w, h, size, crop_ratio)
        view = _resize(x, scale, (rh, rw))[:, top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((view - m) / s).contiguous()


def _resize(x: torch.Tensor, scale: float, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) any dtype -> float32 (C, *size), values / scale; unchanged size: no resampling."""
    x = x.to(torch.float32) / scale
    if tuple(x.shape[1:]) == size:
        return x
    return torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> uint8 (B, 1, H, W) grey by PIL's `convert("L")` (ITU-R 601-2,
    PIL's fixed point: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16), on the images' device.
    For backends that decode RGB only (FFCV)."""
    x = images.to(torch.int32)
    y = (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16
    return y.to(torch.uint8)
