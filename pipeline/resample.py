"""Pillow's antialiased bilinear resize in numba, for FFCV's compiled decoder.

FFCV resizes a crop with OpenCV's INTER_AREA (a box filter) inside its compiled pipeline, where
PIL cannot run; the reference loader (= torchvision) resizes with Pillow's bilinear filter, whose
support widens with the downscale factor (antialiasing). This is Pillow's algorithm
(`libImaging/Resample.c`: separable passes, horizontal first, triangle filter of support
max(1, scale), coefficients normalised and rounded to 22-bit fixed point, rounding to uint8
after each pass), so on the same decoded crop it gives Pillow's pixels exactly
(tests/test_pixels.py).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


@njit(nogil=True, cache=False)
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


@njit(nogil=True, cache=False)
def _clip8(acc) -> np.uint8:
    v = acc >> PRECISION_BITS
    return np.uint8(0 if v < 0 else (255 if v > 255 else v))


@njit(nogil=True, cache=False)
def resize_bilinear(src: np.ndarray, dst: np.ndarray) -> None:
    """src (H, W, 3) uint8 -> dst (h, w, 3) uint8, in place: Pillow's `Image.resize((w, h), BILINEAR)`.
    Only the rows the vertical pass reads are resized horizontally, as Pillow does."""
    in_h, in_w = src.shape[0], src.shape[1]
    out_h, out_w = dst.shape[0], dst.shape[1]
    half = np.int32(1 << (PRECISION_BITS - 1))
    yfirst, ycount, yweights = _coefficients(in_h, out_h)
    need_h, need_v = out_w != in_w, out_h != in_h
    if need_h:
        xfirst, xcount, xweights = _coefficients(in_w, out_w)
        y0 = yfirst[0] if need_v else 0
        y1 = yfirst[out_h - 1] + ycount[out_h - 1] if need_v else in_h
        tmp = np.empty((y1 - y0, out_w, 3), np.uint8)
        for y in range(y1 - y0):
            row = src[y + y0]
            for xx in range(out_w):
                a0 = a1 = a2 = half
                x0 = xfirst[xx]
                for x in range(xcount[xx]):
                    k = xweights[xx, x]
                    a0 += np.int32(row[x0 + x, 0]) * k
                    a1 += np.int32(row[x0 + x, 1]) * k
                    a2 += np.int32(row[x0 + x, 2]) * k
                tmp[y, xx, 0], tmp[y, xx, 1], tmp[y, xx, 2] = _clip8(a0), _clip8(a1), _clip8(a2)
    else:
        y0 = 0
        tmp = src
    if not need_v:
        dst[:] = tmp
        return
    for yy in range(out_h):
        base = yfirst[yy] - y0
        for xx in range(out_w):
            a0 = a1 = a2 = half
            for y in range(ycount[yy]):
                k = yweights[yy, y]
                a0 += np.int32(tmp[base + y, xx, 0]) * k
                a1 += np.int32(tmp[base + y, xx, 1]) * k
                a2 += np.int32(tmp[base + y, xx, 2]) * k
            dst[yy, xx, 0], dst[yy, xx, 1], dst[yy, xx, 2] = _clip8(a0), _clip8(a1), _clip8(a2)
