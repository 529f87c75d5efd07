"""The one decode rule (pipeline/decode.py) and the tree walk / list format (pipeline/folder.py):
every case builds its own input. DALI's and FFCV's agreement with the rule: test_dali.py,
test_ffcv.py."""
import logging
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.pipeline import Augmentation, ImageFolder, scan_folder
from simmim.pipeline.decode import MAX_PIXELS, DecodeError, check_image, decode_rgb
from simmim.pipeline.folder import quote_path, read_file_list, unquote_path
from simmim.pipeline.scan import scan_images, write_file_list

from helpers import EXIF, HOSTILE_BAD, HOSTILE_GOOD, RAMP16, add_decode_cases, make_bomb


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cls = tmp_path_factory.mktemp("cases") / "c"
    cls.mkdir()
    add_decode_cases(cls)
    return cls


def test_exif_orientation_not_applied(cases):
    """All eight Orientation values give the stored 40x20 pixels (what torchvision/timm users get)."""
    ref = np.asarray(decode_rgb(cases / "exif1.JPEG"))
    assert ref.shape == (20, 40, 3)
    for name in EXIF:
        with Image.open(cases / name) as img:
            assert img.getexif()[0x0112] == int(name[4])  # the tag is really there
        np.testing.assert_array_equal(np.asarray(decode_rgb(cases / name)), ref, err_msg=name)


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif", "gray16.pgm"])
def test_16_bit_scaled_not_clipped(cases, name):
    got = np.asarray(decode_rgb(cases / name)).astype(int)
    want = np.rint(RAMP16 / 257).astype(int)  # DALI's rule
    np.testing.assert_array_equal(got[..., 0], want)
    assert (got[..., 0] == got[..., 2]).all() and abs(got.mean() - RAMP16.mean() / 257) < 0.5
    # PIL's own convert("RGB") clips: the case the issue reported (mean ~254, mostly 255)
    if name != "gray16.pgm":
        assert np.asarray(Image.open(cases / name).convert("RGB")).mean() > 200


def test_other_modes(cases):
    rgb16 = np.asarray(decode_rgb(cases / "rgb16.png"))
    assert rgb16.shape == (16, 24, 3) and 100 < rgb16.mean() < 155  # high byte kept, not clipped
    f = np.asarray(decode_rgb(cases / "float.tif")).astype(int)[..., 0]
    np.testing.assert_array_equal(f, np.rint(np.clip(RAMP16 / 65535, 0, 1) * 255).astype(int))
    pal = np.asarray(decode_rgb(cases / "palette_alpha.png"))
    assert pal.shape == (20, 40, 3) and pal.std() > 10  # colours kept, transparency dropped
    assert np.asarray(decode_rgb(cases / "la.png")).shape == (20, 40, 3)
    assert np.asarray(decode_rgb(cases / "animated.webp")).max() == 10  # the first frame
    assert np.asarray(decode_rgb(cases / "pages.tif")).max() == 10  # the first page


@pytest.mark.parametrize("name, reason", [("gif.JPEG", "GIF is not a format"), ("int32.tif", "32-bit integer"),
                                          ("bomb.png", "900000000 pixels, over the limit of 89478485")])
def test_refused(cases, name, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_rgb(cases / name)
    err, size = check_image(cases / name)
    assert reason in err and size == (0, 0)


def test_pnm_maxval(tmp_path):
    (tmp_path / "12.pgm").write_bytes(b"P5\n2 2\n4095\n" + np.full(4, 4095, ">u2").tobytes())
    assert "maxval 4095" in check_image(tmp_path / "12.pgm")[0]  # DALI would give 15, PIL 255
    # below 255: PIL stretches, DALI gives binary (P5/P6) samples as stored, [0, 10, 20, 100], and
    # stretches plain (P2) ones with other rounding, [0, 25, 51, 255] (DALI 1.x on CPU): refused
    (tmp_path / "100.pgm").write_text("P2\n2 2\n100\n0 10 20 100\n")
    (tmp_path / "100b.pgm").write_bytes(b"P5\n2 2\n100\n" + bytes([0, 10, 20, 100]))
    (tmp_path / "100.ppm").write_bytes(b"P6\n2 1\n100\n" + bytes([0, 10, 20, 100, 50, 30]))
    for name in ("100.pgm", "100b.pgm", "100.ppm"):
        assert check_image(tmp_path / name)[0].startswith("PNM with maxval 100:"), name
    (tmp_path / "255.pgm").write_bytes(b"P5\n2 2\n255\n" + bytes([0, 10, 20, 100]))
    np.testing.assert_array_equal(np.asarray(decode_rgb(tmp_path / "255.pgm"))[..., 0].ravel(), [0, 10, 20, 100])


def test_pixel_limit_configurable_and_not_global(cases, tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    assert check_image(cases / "exif1.JPEG", max_pixels=800) == (None, (40, 20))
    err, _ = check_image(cases / "exif1.JPEG", max_pixels=799)
    assert err == "40x20 = 800 pixels, over the limit of 799 (data.max_pixels, --max-pixels)"
    assert Image.MAX_IMAGE_PIXELS == before == MAX_PIXELS  # nothing changed PIL's process-wide limit
    # the bomb, all 30000 x 30000 of it: refused from the header by scan and the torch loader
    root = tmp_path / "bomb"
    (root / "c").mkdir(parents=True)
    make_bomb(root / "c" / "bomb.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c" / "ok.png")
    samples, classes = scan_folder(root)
    result = scan_images(samples, classes, workers=1, progress=False)
    assert [p.split("/")[-1] for p, _ in result.good] == ["ok.png"]
    assert "900000000 pixels" in result.bad[0][1]
    ds = ImageFolder(root, Augmentation(size=8), train=False)
    assert [int(ds[(i, 0)][0].float().sum()) for i in range(2)] == [0, 0]  # bomb skipped, ok.png served
    assert ds._bad.nonzero().flatten().tolist() == [0]  # flagged unreadable (shared with the workers)


def test_hostile_scan_matches_the_rules(hostile):
    samples, classes = scan_folder(hostile)
    result = scan_images(samples, classes, workers=1, progress=False)
    assert sorted(p.split("/")[-1] for p, _ in result.good) == sorted(HOSTILE_GOOD)
    assert sorted(p.split("/")[-1] for p, _ in result.bad) == sorted(HOSTILE_BAD)
    assert len(result.sizes) == len(result.good) and [3000, 4000] in result.sizes.tolist()


def test_symlink_loop_walked_once(tmp_path, caplog):
    """`a/sub/loop -> ..`: 4 real files stay 4 samples, and the skip is reported."""
    a = tmp_path / "root" / "a"
    (a / "sub").mkdir(parents=True)
    for i, d in enumerate((a, a, a / "sub", a / "sub")):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(d / f"{i}.png")
    (a / "sub" / "loop").symlink_to("..")
    (tmp_path / "root" / "b").symlink_to(a)  # a second class linking to the first: walked once
    with caplog.at_level(logging.WARNING):
        samples, classes = scan_folder(tmp_path / "root")
    assert classes == ["a", "b"] and len(samples) == 4 and len({os.path.realpath(p) for p, _ in samples}) == 4
    assert "skipped 2 linked folder(s) already walked" in caplog.text and "loop" in caplog.text


NAMES = ["new\nline.png", "tab\there.png", " lead and trail .png", "#hash.png", "back\\slash\\n.png",
         "ünï cødé.png", "cr\r.png", "ideographic\u3000.png"]


def test_any_file_name_round_trips(tmp_path):
    cls = tmp_path / "root" / "c"
    cls.mkdir(parents=True)
    names = NAMES + ([os.fsdecode(b"latin1-\xe9.png")] if os.name == "posix" else [])
    for i, name in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(os.path.join(cls, name), format="PNG")
    samples, _ = scan_folder(tmp_path / "root")
    assert sorted(os.path.basename(p) for p, _ in samples) == sorted(names)
    lst = tmp_path / "list.txt"
    write_file_list(lst, samples)
    assert len(lst.read_bytes().splitlines()) == len(names)  # one line per sample, whatever the names
    assert read_file_list(lst)[0] == [(os.path.abspath(p), label) for p, label in samples]
    ds = ImageFolder(lst, Augmentation(size=4), train=False)
    for i, (path, _) in enumerate(ds.samples):  # every name opens, and is the file it names
        want = torch.full((3, 4, 4), names.index(os.path.basename(path)), dtype=torch.uint8)
        assert torch.equal(ds[(i, 0)][0], want), path
    assert not ds._bad.any()


def test_list_format_escapes():
    for p in NAMES + ["/plain/path 1.JPEG", "x\\y", "\x7f\x01"]:
        q = quote_path(p)
        assert unquote_path(q) == p and "\n" not in q and "\r" not in q and q == q.strip()
    assert unquote_path("C:\\dir\\file.jpg") == "C:\\dir\\file.jpg"  # unknown escapes are kept


def test_cli_scan_pixel_limit(cases, tmp_path, simmim_cmd):
    root = tmp_path / "r"
    (root / "c").mkdir(parents=True)
    for name in ("exif1.JPEG", "gray16.png"):  # 800 and 2048 pixels
        (root / "c" / name).write_bytes((cases / name).read_bytes())
    out = subprocess.run([*simmim_cmd, "scan", str(root), "--workers", "1", "--max-pixels", "1000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "1 good, 1 bad" in out.stdout, out.stderr
    with pytest.raises(DatasetError, match=r"--max-pixels\) must be an integer in 1\.\."):
        scan_images(scan_folder(root)[0], ["c"], workers=1, progress=False, max_pixels=0)


def _die(paths, **options):
    os._exit(9)  # a worker killed mid-scan (as by the OOM killer)


def test_a_dying_scan_worker_is_one_line(hostile, monkeypatch):
    import simmim.pipeline.scan as scan

    monkeypatch.setattr(scan, "_check_chunk", _die)
    samples, classes = scan_folder(hostile)
    with pytest.raises(DatasetError, match=r"^a scan worker died while checking files from '.*' on \(out of memory\?\)"):
        scan_images(samples, classes, workers=2, chunk=4, progress=False)
