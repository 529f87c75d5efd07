"""Pillow's antialiased bilinear resize in numba, for FFCV's compiled decoder.

FFCV resizes a crop with OpenCV's INTER_AREA (a box filter) inside its compiled pipeline, where
PIL cannot run; the reference loader (= torchvision) resizes with Pillow's bilinear filter, whose
support widens with the downscale factor (antialiasing). This is Pillow's algorithm
(`libImaging/Resample.c`: separable passes, horizontal first (vertical first in some cases since
Pillow 13: `_vertical_first`), triangle filter of support
max(1, scale), coefficients normalised and rounded to 22-bit fixed point, rounding to uint8
after each pass), so on the same decoded crop it gives Pillow's pixels exactly
(tests/test_pixels.py).

Memory order, for speed (the integer arithmetic is Pillow's, so the pixels are too): each pass
runs as a weighted sum of whole contiguous rows, `out[o, :] = sum_t w[o, t] * in[first[o] + t, :]`,
an inner loop over a contiguous vector that LLVM turns into SIMD multiply-adds. The vertical pass is
that already on (rows, width * 3); the horizontal one becomes it on the transposed crop (columns,
rows * 3), and its result is transposed back. Pillow's own C loops (and this module's first version)
run the horizontal pass per output pixel, scalar: on a 230 x 300 crop to 192 x 192, measured with
process CPU time on the loaded 2-core machine (AMD EPYC) in one run, this 93 us, the per-pixel
loops 473 us, OpenCV's INTER_AREA (one thread) 306 us. (The first version always ran the
horizontal pass first: one level off Pillow 13 on ~15% of the pixels of 8 in 60 sample crops.)
"""
from __future__ import annotations

import math

import numpy as np
import PIL
from numba import njit

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13  # the installed Pillow's pass order


@njit(nogil=True, cache=True)
def _coefficients(in_size: int, out_size: int):
    """Per output index: first input index, tap count, and (out_size, ksize) int64 fixed-point weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, ksize), np.int32)  # sums stay below 2^31, as in Pillow
    k = np.empty(ksize, np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            w = 1.0 - t if t < 1.0 else 0.0
            k[x] = w
            ww += w
        for x in range(xmax):
            v = k[x] / ww if ww != 0.0 else k[x]
            weights[xx, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        first[xx], count[xx] = xmin, xmax
    return first, count, weights


@njit(nogil=True, cache=True)
def _weighted_rows(src, first, count, weights, dst) -> None:
    """dst[o, :] = clip8((sum_t src[first[o] + t, :] * weights[o, t] + half) >> PRECISION_BITS) for
    every row o of dst: src (n_in, L) uint8, dst (n_out, L) uint8, both C-contiguous rows."""
    n = src.shape[1]
    half = np.int32(1 << (PRECISION_BITS - 1))
    acc = np.empty(n, np.int32)
    for o in range(dst.shape[0]):
        acc[:] = half
        f = first[o]
        for t in range(count[o]):
            k = weights[o, t]
            row = src[f + t]
            for i in range(n):
                acc[i] += np.int32(row[i]) * k
        out = dst[o]
        for i in range(n):
            v = acc[i] >> PRECISION_BITS
            out[i] = np.uint8(0 if v < 0 else (255 if v > 255 else v))


@njit(nogil=True, cache=True)
def _horizontal(src, y0: int, rows: int, out_w: int) -> np.ndarray:
    """Pillow's horizontal pass over rows y0 .. y0 + rows of src (H, W, 3) uint8 (any strides):
    (rows, out_w * 3) uint8, computed on the transposed crop (module docstring)."""
    in_w = src.shape[1]
    xfirst, xcount, xweights = _coefficients(in_w, out_w)
    src_t = np.empty((in_w, rows * 3), np.uint8)  # (W, rows * 3): column x of the crop as a row
    for y in range(rows):
        r = src[y0 + y]
        for x in range(in_w):
            src_t[x, 3 * y], src_t[x, 3 * y + 1], src_t[x, 3 * y + 2] = r[x, 0], r[x, 1], r[x, 2]
    tmp_t = np.empty((out_w, rows * 3), np.uint8)
    _weighted_rows(src_t, xfirst, xcount, xweights, tmp_t)
    tmp = np.empty((rows, out_w * 3), np.uint8)
    for xx in range(out_w):
        c = tmp_t[xx]
        for y in range(rows):
            tmp[y, 3 * xx], tmp[y, 3 * xx + 1], tmp[y, 3 * xx + 2] = c[3 * y], c[3 * y + 1], c[3 * y + 2]
    return tmp


@njit(nogil=True, cache=True)
def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int, pillow13: bool) -> bool:
    """Pillow's order of the two passes: since Pillow 13 (python-pillow/Pillow#9549) the vertical
    pass runs first when the height shrinks by more than twice as many pixels as the width (found
    on Pillow 13.0.0 by comparing both orders against its resize; tests/test_pixels.py), before
    that always the horizontal pass. Each pass rounds to uint8, so the order shows in the pixels."""
    return pillow13 and out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


@njit(nogil=True, cache=True)
def resize_bilinear(src: np.ndarray, dst: np.ndarray, pillow13: bool = VERTICAL_FIRST_RULE) -> None:
    """src (H, W, 3) uint8 (any strides: a crop of a decoded image) -> dst (h, w, 3) uint8,
    C-contiguous, in place: Pillow's `Image.resize((w, h), BILINEAR)`, its two passes in its order
    (`_vertical_first`). Only the rows the vertical pass reads are resized horizontally, and a pass
    whose size does not change is skipped, as Pillow does. `pillow13`: Pillow 13's pass order
    (default: the installed Pillow's; an argument, not a global, so numba's on-disk cache of the
    compiled function is keyed by it)."""
    in_h, in_w = src.shape[0], src.shape[1]
    out_h, out_w = dst.shape[0], dst.shape[1]
    yfirst, ycount, yweights = _coefficients(in_h, out_h)
    need_v = out_h != in_h
    flat = dst.reshape(out_h, out_w * 3)
    if need_v and out_w != in_w and _vertical_first(in_h, in_w, out_h, out_w, pillow13):
        rows = np.empty((in_h, in_w, 3), np.uint8)  # contiguous rows for the whole-row pass
        rows[:] = src
        tmp = np.empty((out_h, in_w * 3), np.uint8)
        _weighted_rows(rows.reshape(in_h, in_w * 3), yfirst, ycount, yweights, tmp)
        flat[:] = _horizontal(tmp.reshape(out_h, in_w, 3), 0, out_h, out_w)
        return
    y0 = yfirst[0] if need_v else 0
    rows = yfirst[out_h - 1] + ycount[out_h - 1] - y0 if need_v else in_h
    if out_w != in_w:
        tmp = _horizontal(src, y0, rows, out_w)
    else:
        tmp = np.empty((rows, in_w, 3), np.uint8)
        tmp[:] = src[y0:y0 + rows]
        tmp = tmp.reshape(rows, in_w * 3)
    if need_v:
        _weighted_rows(tmp, yfirst - y0, ycount, yweights, flat)
    else:
        flat[:] = tmp


@njit(nogil=True, cache=True)
def flip_in_place(img: np.ndarray) -> None:
    """img (H, W, C) uint8 mirrored left-right in place (torchvision's hflip), pixels swapped pairwise:
    no temporary (FFCV's decoder used `img[:, ::-1].copy()`, 119 us against 18 us at 192 px)."""
    w = img.shape[1]
    for y in range(img.shape[0]):
        row = img[y]
        for x in range(w // 2):
            for c in range(img.shape[2]):
                a = row[x, c]
                row[x, c] = row[w - 1 - x, c]
                row[w - 1 - x, c] = a
