"""Test data the loader tests share: hostile files, and images whose pixels tell where they came
from, so a loader's crops and flips can be measured from its output alone."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.pipeline.augment import denormalize

# every kind of odd-but-valid image real data holds, and the broken kinds (see pipeline/decode.py)
EXIF = tuple(f"exif{o}.JPEG" for o in range(1, 9))  # 40x20 pixels, EXIF Orientation 1..8
HOSTILE_GOOD = ("ok.JPEG", "cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "rgba.png", "thin.JPEG",
                "wide.JPEG", "tiny.JPEG", "large.JPEG", "progressive.JPEG", *EXIF, "gray16.png", "rgb16.png",
                "palette_alpha.png", "la.png", "gray16.tif", "float.tif", "gray16.pgm", "animated.webp", "bi.bmp",
                "pages.tif", "j2k.jp2")
HOSTILE_BAD = ("empty.JPEG", "text.JPEG", "truncated.JPEG", "._ok.JPEG", "bomb.png", "gif.JPEG", "int32.tif")
RAMP16 = (np.arange(64 * 32, dtype=np.uint16) * 16).reshape(32, 64)  # 16-bit grey, 0..32752


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB or huge images cheaply): `rows` yields
    each row's raw bytes (filter byte added here)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    head = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def make_bomb(path: Path, side: int = 30000) -> Path:
    """A side x side 1-bit black PNG (30000: 900 Mpx in ~110 KB), the issue's decompression bomb."""
    row = bytes((side + 7) // 8)
    path.write_bytes(png_bytes(side, side, 1, 0, (row for _ in range(side))))
    return path


def make_hostile(root: Path) -> Path:
    cls = root / "n0"
    cls.mkdir(parents=True)
    add_decode_cases(cls)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    rgb.save(cls / "ok.JPEG")
    rgb.convert("CMYK").save(cls / "cmyk.JPEG")
    rgb.convert("L").save(cls / "gray.JPEG")
    rgb.save(cls / "png_named.JPEG", format="PNG")
    rgb.convert("RGBA").save(cls / "rgba.png")
    rgb.save(cls / "progressive.JPEG", progressive=True)
    Image.fromarray(np.zeros((2000, 20, 3), np.uint8)).save(cls / "thin.JPEG")
    Image.fromarray(np.full((8, 3000, 3), 200, np.uint8)).save(cls / "wide.JPEG")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(cls / "tiny.JPEG")
    big = np.random.default_rng(1).integers(0, 255, (4000, 3000, 3), dtype=np.uint8)
    Image.fromarray(big).resize((3000, 4000)).save(cls / "large.JPEG", quality=50)
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "text.JPEG").write_text("not an image")
    data = (cls / "ok.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(data[: len(data) // 3])
    (cls / "._ok.JPEG").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))  # AppleDouble
    return root


def add_decode_cases(cls: Path) -> None:
    """The decode rules' cases (pipeline/decode.py), small files in `cls`."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o  # Orientation
        Image.fromarray(rgb).save(cls / f"exif{o}.JPEG", exif=exif, quality=95)
    Image.fromarray(RAMP16).save(cls / "gray16.png")  # mode I;16
    Image.fromarray(RAMP16).save(cls / "gray16.tif")
    (cls / "gray16.pgm").write_bytes(b"P5\n64 32\n65535\n" + RAMP16.astype(">u2").tobytes())  # PIL: mode I
    rgb16 = rng.integers(0, 65536, (16, 24, 3)).astype(">u2")
    (cls / "rgb16.png").write_bytes(png_bytes(24, 16, 16, 2, (r.tobytes() for r in rgb16)))
    Image.fromarray(RAMP16.astype(np.float32) / 65535).save(cls / "float.tif")  # mode F, 0..0.5
    Image.fromarray(RAMP16.astype(np.int32) * 1000).save(cls / "int32.tif")  # mode I, no agreed range
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(cls / "palette_alpha.png", transparency=3)
    Image.fromarray(rgb).convert("LA").save(cls / "la.png")
    Image.fromarray(rgb).save(cls / "bi.bmp")
    frames = [Image.fromarray(np.full((20, 40, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(cls / "animated.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(cls / "pages.tif", save_all=True, append_images=frames[1:])  # multi-page: the first
    Image.fromarray(rgb).save(cls / "j2k.jp2")  # JPEG 2000 (PIL's OpenJPEG)
    Image.fromarray(rgb).save(cls / "gif.JPEG", format="GIF")  # PIL reads GIF, DALI does not
    # the bomb is 30000 px a side; a header that large with no data is refused the same way
    (cls / "bomb.png").write_bytes(png_bytes(30000, 30000, 1, 0, [bytes(3750)]))


RAMP = 256


def make_ramps(root: Path, n: int = 48, classes: int = 2, fmt: str = "PNG") -> Path:
    """n RAMP x RAMP images with red = x and green = y (blue = 128): a crop's box and flip can be
    read off the output's edges."""
    x = np.arange(RAMP, dtype=np.uint8)
    img = np.stack([np.tile(x[None, :], (RAMP, 1)), np.tile(x[:, None], (1, RAMP)),
                    np.full((RAMP, RAMP), 128, np.uint8)], axis=-1)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.{'png' if fmt == 'PNG' else 'JPEG'}", format=fmt)
    return root


def crop_stats(images: torch.Tensor, mean, std) -> dict[str, np.ndarray]:
    """Area fraction, aspect (w/h) and flip of each ramp image's crop, from normalised outputs."""
    x = denormalize(images, mean, std).double() * 255  # (B, 3, S, S)
    s = x.shape[-1]
    red, green = x[:, 0], x[:, 1]
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    flip = left > right
    w = (left - right).abs() / (1 - 1 / s)
    h = (bottom - top) / (1 - 1 / s)
    return {"area": (w * h / RAMP ** 2).numpy(), "aspect": (w / h).numpy(), "flip": flip.numpy()}


def loader_crop_stats(loader, aug, epochs: int = 6) -> dict[str, np.ndarray]:
    """crop_stats over `epochs` epochs of a loader of ramp images (no masks)."""
    parts = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        parts += [crop_stats(images, aug.mean, aug.std) for (images,) in loader]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_same_augmentation(got: dict, ref: dict, tol_area: float = 0.04, tol_log_aspect: float = 0.06) -> None:
    """Percentiles of area and log aspect agree; flip rates both ~0.5."""
    for q in (10, 25, 50, 75, 90):
        a, b = np.percentile(got["area"], q), np.percentile(ref["area"], q)
        assert abs(a - b) < tol_area, f"area p{q}: {a:.3f} vs reference {b:.3f}"
        a, b = np.percentile(np.log(got["aspect"]), q), np.percentile(np.log(ref["aspect"]), q)
        assert abs(a - b) < tol_log_aspect, f"log aspect p{q}: {a:.3f} vs reference {b:.3f}"
    assert got["area"].min() > 0.6 and got["area"].max() < 1.03
    assert got["aspect"].min() > 0.7 and got["aspect"].max() < 1.4
    for stats in (got, ref):
        assert abs(stats["flip"].mean() - 0.5) < 0.12


BACKEND_OF = {"ReferenceLoader": "torch", "FFCVLoader": "ffcv", "DALILoader": "dali"}
DALI_FIELDS = {"decode_device": "device", "hw_decoder_load": "hw_decoder_load", "prefetch": "prefetch",
               "threads": "threads", "preallocate": "preallocate"}
FFCV_FIELDS = ("order", "os_cache", "buffer_pages", "batches_ahead")


def make_loader(backend, path, aug, masks, batch_size: int, num_workers: int = 0, device="cpu", rank: int = 0,
                world_size: int = 1, seed: int = 0, **fields):
    """A loader from the tests' short form: `backend` a loader class (built directly) or a backend
    name (through `build_loader`); `fields` are `LoaderSpec` fields, or `FFCVOptions` /
    `DALIOptions` fields by name (`decode_device` for DALI's `device`)."""
    from simmim.pipeline import LoaderSpec, build_loader
    from simmim.pipeline.options import DALIOptions, FFCVOptions

    dali = {DALI_FIELDS[k]: fields.pop(k) for k in list(fields) if k in DALI_FIELDS}
    ffcv = {k: fields.pop(k) for k in list(fields) if k in FFCV_FIELDS}
    name = backend if isinstance(backend, str) else BACKEND_OF[backend.__name__]
    spec = LoaderSpec(name, str(path), aug, batch_size, num_workers, ffcv=FFCVOptions(**ffcv),
                      dali=DALIOptions(**dali), **fields)
    if isinstance(backend, str):
        return build_loader(spec, masks, device, rank, world_size, seed)
    return backend(spec, masks, device, rank, world_size, seed)


def run_until(proc: subprocess.Popen, marker: str, act, timeout: float = 60) -> str:
    """Reads a trainer's output (text, stderr merged, own session) until a line holds `marker`,
    calls act(), and returns the whole output; the trainer must end within `timeout` s (else it is
    killed and the test fails, quoting the end of its output)."""
    import pytest

    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            act()
            break
    try:
        rest = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the trainer hung:\n" + "".join(seen[-20:]) + proc.communicate()[0][-3000:])
    return "".join(seen) + rest


def run_sh_env(world_size: int = 2) -> dict:
    """The environment for `trainer/run.sh` with `world_size` CPU ranks on a free localhost port, no restarts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "GPUS_PER_NODE": str(world_size), "MASTER_PORT": str(port), "MAX_RESTARTS": "0"}


def child_pids(pid: int) -> list[int]:
    """The pids of `pid`'s direct children, from /proc (Linux)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def knn_monitor_warnings(backend: str, path, out_dir, caplog) -> tuple[object, list[str]]:
    """The demo recipe with run.knn_every=1 on `backend` reading `path` (training and validation):
    (the k-NN monitor PretrainTask builds, the k-NN warnings it logged)."""
    import logging

    from simmim.trainer.config import load_config
    from simmim.trainer.distributed import DistInfo
    from simmim.trainer.pretrain import PretrainTask

    cfg = load_config("demo", [f"data.backend={backend}", f"data.path={path}", f"data.val_path={path}",
                               "run.knn_every=1", f"run.out_dir={out_dir}"])
    with caplog.at_level(logging.WARNING, logger="simmim"):
        monitor = PretrainTask(cfg).knn_monitor(DistInfo(rank=0, local_rank=0, world_size=1,
                                                         device=torch.device("cpu")))
    return monitor, [r.getMessage() for r in caplog.records if "knn" in r.getMessage()]
