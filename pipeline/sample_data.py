"""The embedded sample dataset: an ImageNet-style class-folder tree of JPEGs, built offline.

Made from the real photographs that scikit-image ships inside its package (no download): each
photograph gives several JPEGs cut at random and resized to ImageNet-like sizes and aspect ratios
(long side 300-500 px; 4:3, 3:4, 3:2, 2:3, 1:1), grayscale ones kept grayscale as in ImageNet.
Classes group photographs by subject, so the set also serves classification demos.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import skimage
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.core.io import atomic_folder, remove_stale_partials

log = logging.getLogger(__name__)

# class -> scikit-image data files (all shipped in skimage/data, none fetched)
CLASSES = {
    "n01_people": ["astronaut.png", "camera.png"],
    "n02_animal": ["chelsea.png", "coffee.png"],
    "n03_vehicle": ["motorcycle_left.png", "motorcycle_right.png", "rocket.jpg"],
    "n04_texture": ["brick.png", "grass.png", "gravel.png"],
    "n05_science": ["hubble_deep_field.jpg", "retina.jpg", "ihc.png", "moon.png", "coins.png"],
}
ASPECTS = (4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0)
COMPLETE = ".complete"


def skimage_photo(name: str) -> Image.Image:
    path = Path(skimage.__file__).parent / "data" / name
    if not path.exists():
        raise DatasetError(f"scikit-image does not ship {name} in {path.parent}: reinstall it "
                           f"(pip install --force-reinstall scikit-image)")
    img = Image.open(path)
    img.load()
    return img.convert("L") if img.mode in ("L", "I", "I;16", "1") else img.convert("RGB")


def random_view(img: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop (35-100% of the area) at an ImageNet-like size and aspect."""
    aspect = rng.choice(ASPECTS)
    long_side = rng.randint(300, 500)
    out_w, out_h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    frac = rng.uniform(0.35, 1.0)
    crop_w = min(img.width, round((img.width * img.height * frac * aspect) ** 0.5))
    crop_h = min(img.height, round(crop_w / aspect))
    left = rng.randint(0, img.width - crop_w)
    top = rng.randint(0, img.height - crop_h)
    view = img.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def write_views(root: Path, per_photo: int, val_per_photo: int, seed: int, count: int) -> None:
    """root/{train,val}/<class>/*.JPEG: `per_photo` (`val_per_photo`) random views of each photograph,
    then the `COMPLETE` marker, written last, naming the `count` images."""
    rng = random.Random(seed)
    for cls, photos in CLASSES.items():
        for photo in photos:
            img = skimage_photo(photo)
            stem = Path(photo).stem
            for split, n in (("train", per_photo), ("val", val_per_photo)):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    random_view(img, rng).save(folder / f"{cls}_{stem}_{i:03d}.JPEG", "JPEG",
                                               quality=rng.randint(80, 95))
    (root / COMPLETE).write_text(f"{count} images\n")


def build_sample_dataset(out: str | os.PathLike, per_photo: int = 16, val_per_photo: int = 4,
                         seed: int = 0, force: bool = False) -> Path:
    """Writes out/train/<class>/*.JPEG and out/val/<class>/*.JPEG; returns `out`.

    Atomic (`atomic_folder`, core/io.py): built in a temporary folder beside `out` and renamed into
    place, so an interrupted build never leaves a half-filled dataset, and the temporary folder of a killed
    one is removed by the next start. An existing complete build is kept unless `force`.
    """
    out = Path(out)
    remove_stale_partials(out)  # a build killed before it finished (SIGKILL, SIGTERM)
    if (out / COMPLETE).exists() and not force:
        log.info("sample dataset already at %s", out)
        return out
    count = sum(len(photos) for photos in CLASSES.values()) * (per_photo + val_per_photo)
    atomic_folder(out, lambda tmp: write_views(tmp, per_photo, val_per_photo, seed, count))
    log.info("built sample dataset: %d JPEGs in %d classes at %s", count, len(CLASSES), out)
    return out
