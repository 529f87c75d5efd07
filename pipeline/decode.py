"""What an image is, for every backend: the one decode rule of the loaders, `simmim scan` and
`simmim convert`.

`decode_rgb(path)` returns a PIL RGB image (uint8, 3 channels), or raises `DecodeError` with a
one-line reason. The rules, chosen so that DALI's decoder (`DALI_DECODE_ARGS`) gives the same
pixels and refuses the same files:

- Formats: JPEG (and camera MPO), PNG, BMP, TIFF, WebP, PNM and JPEG 2000 -- the formats DALI
  decodes. Anything else PIL can read (GIF, ICO, TGA, PSD, ...) is refused, whatever its name.
- Orientation: the EXIF Orientation tag is not applied; pixels come out as stored. This is what
  torchvision's `ImageFolder` and timm's datasets give (PIL's `Image.open(...).convert("RGB")`);
  DALI is told the same (`adjust_orientation=False`).
- Bit depth: 16-bit samples are scaled to 8 bits, round(v / 257), as DALI does (PIL's own
  `convert` clips them to 255). PIL reads 16-bit RGB(A) PNGs by keeping the high byte, v >> 8, so
  those may differ from DALI by one level. A PNM whose maxval is neither 255 nor 65535 is
  refused (PIL stretches it to the full range, DALI does not: maxval 100 gives mean 111.8 in PIL,
  43.8 in DALI). Float images (TIFF mode
  F) are read as [0, 1] and scaled by 255, as DALI does. 32-bit integer images have no agreed
  range and are refused.
- Colour: grey, palette (with or without transparency), CMYK (Adobe-inverted or not) and YCbCr
  become RGB; an alpha channel is dropped (the colour channels as stored, as DALI does). A TIFF of
  more than 3 samples per pixel (or one PIL reads with fewer bands) is refused, naming
  data.channels: a multi-band TIFF's 4th band is data, never dropped as alpha.
- Grey (`decode_grey`, data.channels=1): the same rules, then one channel. A grey image keeps its
  values; any other becomes RGB as above, then grey by PIL's `convert("L")`, ITU-R 601-2 luma
  L = R * 299/1000 + G * 587/1000 + B * 114/1000 (in PIL's fixed point, rounded). L -> RGB -> L is
  the identity, so a grey file gives the same values either way.
- Frames: the first frame of an animated or multi-page file.
- Size: an image of more than `max_pixels` pixels (width x height, from its header) is refused
  before anything is decoded. The default is PIL's own decompression-bomb limit; nothing here
  changes PIL's process-wide `Image.MAX_IMAGE_PIXELS`, so a limit is at most twice that value
  (PIL's `open` refuses larger images itself).
- Files: anything but a regular file (a FIFO, socket or device) is refused before it is opened.
- Empty: zero-byte files and images of zero width or height are refused.

Sources: PIL's `Image.open`/`convert` and mode list (pillow.readthedocs.io, "Concepts: Modes");
DALI's `fn.decoders.image` arguments `adjust_orientation` and `dtype` (docs.nvidia.com/deeplearning/dali).
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image

from simmim.core.errors import ConfigError, DatasetError

# PIL's default decompression-bomb threshold (89,478,485 pixels): the torch loader's limit before
# this module existed. PIL's open() raises above twice its threshold regardless of ours.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
# DALI decoder arguments that implement the same rules (the rest are DALI's defaults: RGB uint8,
# 16-bit and float inputs scaled to the uint8 range, alpha dropped, first frame).
DALI_DECODE_ARGS = {"adjust_orientation": False}


class DecodeError(Exception):
    """A file that is not an image by our rules; str() is a one-line reason."""


def pil_pixel_ceiling() -> int:
    """The largest `max_pixels` PIL can honour without a process-wide change."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 1 << 62


def check_max_pixels(max_pixels: int, key: str = "data.max_pixels") -> int:
    """`max_pixels` if it is usable, else ConfigError (a UserError, a ValueError) naming `key`."""
    ceiling = pil_pixel_ceiling()
    if not isinstance(max_pixels, int) or not 1 <= max_pixels <= ceiling:
        raise ConfigError(f"{key} must be an integer in 1..{ceiling} (PIL refuses larger images), got {max_pixels}")
    return max_pixels


def checked_max_pixels(max_pixels: int) -> int:
    """check_max_pixels for the loaders: a DatasetError naming data.max_pixels."""
    try:
        return check_max_pixels(max_pixels)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def decode_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """The RGB image at `path` by the module's rules: a PIL image of mode RGB, (H, W, 3) uint8.

    draft: for a JPEG, decode at the smallest DCT scale (1/8 .. 1) that still covers `draft`
    pixels on both sides (the caller resizes exactly afterwards); the whole entropy-coded stream
    is still read, so truncation and corruption are still found.
    Raises DecodeError (one line) for a file that breaks a rule or does not decode.
    """
    return _decode(path, max_pixels, draft)[0]


def decode_grey(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The grey image at `path` by the module's rules (data.channels=1): a PIL image of mode L,
    (H, W) uint8. Raises DecodeError (one line) where `decode_rgb` would."""
    return _decode(path, max_pixels, None, grey=True)[0]


def decode_rgb_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`decode_rgb` of an image file held in memory (the encoded bytes a shard stores, `shards.py`):
    the same rules and the same pixels as reading the file. Raises DecodeError (one line)."""
    return _decode(io.BytesIO(data), max_pixels, None)[0]


def _decode(path, max_pixels: int, draft: int | None, grey: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """decode_rgb (decode_grey with `grey`), and the (width, height) of the header (before any draft
    scaling). `path`: a file's path, or a BytesIO of its bytes."""
    in_memory = isinstance(path, io.BytesIO)
    try:
        if not in_memory and not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() forever
            raise DecodeError(f"not a regular file ({file_kind(path)})")
        with warnings.catch_warnings():
            # PIL warns between its threshold and twice it; our own limit decides (below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
                rgb = _to_rgb(img, max_pixels, draft, grey)
                return (rgb.convert("L") if grey and rgb.mode != "L" else rgb), size
    except (DecodeError, MemoryError, RecursionError):  # ours, or the process's state: not the file's
        raise
    except Image.DecompressionBombError as e:  # PIL's own ceiling, from the header too
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = found.group(1) if found else f"more than {pil_pixel_ceiling()}"
        raise DecodeError(f"{pixels} pixels, over the limit of {max_pixels} (data.max_pixels, --max-pixels)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file; named in one line
        empty = path.getbuffer().nbytes == 0 if in_memory else os.path.exists(path) and os.path.getsize(path) == 0
        if isinstance(e, OSError) and empty:
            raise DecodeError("zero bytes") from None
        raise DecodeError(f"{type(e).__name__}: {e}".splitlines()[0][:200]) from None


def _to_rgb(img: Image.Image, max_pixels: int, draft: int | None, grey: bool = False) -> Image.Image:
    """RGB by the module's rules; with `grey`, a grey image (mode L, or 16-bit / float grey scaled)
    is returned as mode L instead (the caller converts the others)."""
    w, h = img.size
    if img.format not in FORMATS:
        raise DecodeError(f"{img.format} is not a format every loader decodes ({', '.join(sorted(FORMATS))})")
    if w * h > max_pixels:  # from the header: nothing decoded yet
        raise DecodeError(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (data.max_pixels, --max-pixels)")
    if w < 1 or h < 1:
        raise DecodeError(f"empty image ({w}x{h})")
    if img.format == "PPM":  # PIL stretches any maxval to the full range; DALI only up to 255
        maxval = next((t.args[1] for t in img.tile if t.codec_name in ("ppm", "ppm_plain")), None)
        if maxval is not None and maxval not in (255, 65535):
            raise DecodeError(f"PNM with maxval {maxval}: loaders scale it differently; store it with maxval 255 or 65535")
    samples = img.tag_v2.get(277, 1) if img.format == "TIFF" else 0  # SamplesPerPixel
    if img.mode != "CMYK" and (samples > 3 or (samples and samples != len(img.getbands()))):
        # a multi-band TIFF (satellite, microscopy): its 4th band is data, not alpha, whatever the tag
        # says (tifffile tags 4 samples RGB + alpha by default): never dropped
        raise DecodeError(f"a TIFF of {samples} bands: this run reads {'grey' if grey else 'RGB'} images; set "
                          f"data.channels={samples} (data.backend=torch) to train on every band")
    if draft is not None and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft, draft))
    img.load()  # first frame only: PIL opens animated and multi-page files at frame 0
    mode = img.mode
    if mode == "RGB" or (grey and mode == "L"):
        return img.copy()
    if mode.startswith("I;16") or (mode == "I" and img.format in ("PNG", "PPM")):
        # 16-bit grey (PIL reads 16-bit PNM as mode I): scale, do not clip
        v = np.asarray(img).astype(np.float64)
        return _grey(np.clip(np.rint(v / 257), 0, 255), grey)
    if mode == "I":
        raise DecodeError("32-bit integer pixels have no agreed range; store 8 or 16 bits per sample")
    if mode == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return _grey(np.rint(np.clip(v, 0.0, 1.0) * 255), grey)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns on P -> RGB with transparency; same colours via RGBA
    return img.convert("RGB")


def file_kind(path) -> str:
    """What a path that is not a regular file is ("a FIFO", "a socket", "a folder", ...), for messages."""
    mode = os.stat(path).st_mode
    return next((what for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                         (stat.S_ISDIR, "a folder")) if test(mode)), "not a regular file")


def _grey(v: np.ndarray, keep_grey: bool = False) -> Image.Image:
    img = Image.fromarray(v.astype(np.uint8), "L")
    return img if keep_grey else img.convert("RGB")


def check_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, grey: bool = False
                ) -> tuple[str | None, tuple[int, int]]:
    """(None, (width, height)) if `path` decodes by the rules (`grey`: `decode_grey`'s, whose
    reasons name a grey run), else (one-line reason, (0, 0)). Cheap for a JPEG: decoded at 1/8
    scale (see `decode_rgb`'s draft); the size is the header's."""
    try:
        return None, _decode(path, max_pixels, draft=1, grey=grey)[1]
    except DecodeError as e:
        return str(e), (0, 0)
    except Exception as e:  # noqa: BLE001 - e.g. a file deleted meanwhile
        return f"{type(e).__name__}: {e}".splitlines()[0][:200], (0, 0)
