"""Many bad files told in a few lines (pipeline/skips.py): `simmim scan`, the loaders' checked list,
the figure preview, the torch loader's own skips and `convert`; one line with the fix when every
file holds another channel count. Every case builds its own small files."""
import json
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.pipeline import Augmentation, ImageFolder, LoaderSpec, build_loader
from simmim.pipeline.convert import drop_failures
from simmim.pipeline.decode import check_image
from simmim.pipeline.folder import clean_list_path, unquote_path
from simmim.pipeline.scan import bad_list_path
from simmim.pipeline.scanlist import checked_samples, scan_command
from simmim.pipeline.skips import NAMED, reason_kind

TRUNCATED, EMPTY, GOOD = 30, 8, 3


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def broken_folder(root):
    """GOOD JPEGs, TRUNCATED JPEGs cut at as many different lengths, EMPTY zero-byte files."""
    root.mkdir(parents=True)
    whole = jpeg_bytes(0, 64)
    for i in range(GOOD):
        (root / f"good{i}.jpg").write_bytes(jpeg_bytes(i))
    for i in range(TRUNCATED):  # cut in the entropy-coded data, each at another length
        (root / f"cut{i:02d}.jpg").write_bytes(whole[:len(whole) - 40 - 17 * i])
    for i in range(EMPTY):
        (root / f"empty{i}.jpg").write_bytes(b"")
    return root


def skip_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]


def summaries(caplog):
    return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]


def test_many_bad_files_are_a_few_lines_and_one_summary(tmp_path, caplog):
    """38 bad files of 41: NAMED lines naming files, then ONE line counting them by kind (the byte
    counts in the truncation reasons do not split the group) and naming LIST.bad.txt, which holds
    every bad file with its reason; the report still lists them all."""
    root = broken_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        result = scan_command(str(root), None, workers=1, on_error="skip")
    bad = TRUNCATED + EMPTY
    assert len(result.bad) == bad and len(result.good) == GOOD
    assert len(skip_lines(caplog)) == NAMED, skip_lines(caplog)
    (line,) = summaries(caplog)
    listed = bad_list_path(clean_list_path(root))
    assert f"skipped {bad} of {bad + GOOD} files of {root}" in line and f"{EMPTY}: zero bytes" in line
    counts = sorted(int(part.split(":")[0]) for part in line.split("(", 1)[1].split(")")[0].split("; "))
    assert sum(counts) == bad and EMPTY in counts and len(counts) <= 3, line  # a few kinds, not one per length
    assert str(listed) in line
    rows = [row.split("\t") for row in listed.read_text().splitlines()]
    assert sorted(unquote_path(p) for p, _ in rows) == sorted(p for p, _ in result.bad)
    assert dict((unquote_path(p), r) for p, r in rows) == dict(result.bad)
    report = json.loads(clean_list_path(root).with_name(root.name + ".clean.report.json").read_text())
    assert report["bad"] == bad


def test_loader_check_tells_new_bad_files_once(tmp_path, caplog):
    """The loaders' check of a folder (DALI's path; the torch loader's with a list beside it):
    the first check names NAMED files and counts the rest in one line; a second run, whose record
    already knows them, names none."""
    root = broken_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        samples, _ = checked_samples(str(root), 1 << 26, 1, required=True, who="dali")
    assert len(samples) == GOOD
    assert len(skip_lines(caplog)) == NAMED and len(summaries(caplog)) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        checked_samples(str(root), 1 << 26, 1, required=True, who="dali")
    assert not skip_lines(caplog) and not summaries(caplog)


@pytest.mark.parametrize("kind", ["npy", "tif"])
def test_every_file_of_another_channel_count_is_one_line_naming_the_fix(tmp_path, caplog, kind):
    """40 four-channel files read with 1 channel: `simmim scan` ends with the one line naming
    --channels 4, the loaders' check and the torch backend's figure preview (no list beside the
    folder) with data.channels=4; no line per file before it."""
    root = tmp_path / "four"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        a = rng.integers(0, 256, (12 + i % 3, 10, 4), dtype=np.uint8)  # shapes differ: still one cause
        np.save(root / f"{i}.npy", a) if kind == "npy" else tifffile.imwrite(root / f"{i}.tif", a)
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError) as err:
        scan_command(str(root), None, workers=1, on_error="skip", channels=1)
    assert str(err.value) == f"every file of {root} (40) has 4 channels, not --channels=1: pass --channels 4"
    assert not skip_lines(caplog)
    assert len(bad_list_path(clean_list_path(root)).read_text().splitlines()) == 40
    with pytest.raises(DatasetError, match=r"\(40\) has 4 channels, not data.channels=1: set data.channels=4 "
                                           r"\(data.backend=torch\)$"):
        checked_samples(str(root), 1 << 26, 1, required=True, who="dali", channels=1)
    bad_list_path(clean_list_path(root)).unlink()
    aug = Augmentation(size=8, mean=(0.5,), std=(0.25,))
    loader = build_loader(LoaderSpec("torch", str(root), aug, batch_size=2, num_workers=0, channels=1), None, "cpu")
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError, match=r"has 4 channels, not "
                                                                            r"data.channels=1: set data.channels=4"):
        loader.preview_batch(8)
    assert not skip_lines(caplog)


def test_convert_and_a_mixed_failure_say_what_failed(tmp_path):
    """convert (FFCV stores RGB): all 4-band TIFFs name the torch backend's data.channels; files
    that fail for several reasons give the counts by kind instead of a bare "nothing decodes"."""
    failed = tmp_path / "failed"
    failed.mkdir()
    band = "a TIFF of 5 bands: this run reads RGB images; set data.channels=5 (data.backend=torch) to train on every band"
    for i in range(6):
        (failed / str(i)).write_text(json.dumps([f"/d/{i}.tif", band]))
    with pytest.raises(DatasetError, match=r"^every file of /d \(6\) has 5 channels, this command reads 3: "
                                           r"pre-train on them with data.backend=torch data.channels=5$"):
        drop_failures(tmp_path / "x.beton", failed, 6, "/d", "skip")
    (failed / "6").write_text(json.dumps(["/d/6.jpg", "zero bytes"]))
    with pytest.raises(DatasetError, match=r"^none of the 7 files of /d reads \(6: 5 channels, data.channels is 3; "
                                           r"1: zero bytes\)$"):
        drop_failures(tmp_path / "x.beton", failed, 7, "/d", "skip")


def test_torch_loader_names_a_few_unreadable_files_then_counts(tmp_path, caplog):
    """No list beside the folder: the torch loader finds bad files while it reads; it names NAMED
    of them, then one line at the epoch's end counts them all."""
    root = broken_folder(tmp_path / "data")
    ds = ImageFolder(root, Augmentation(size=16))
    with caplog.at_level(logging.WARNING):
        for i in range(len(ds)):
            ds[(i, i)]
    assert ds.bad_count() == TRUNCATED + EMPTY
    assert len([m for m in skip_lines(caplog) if "skipping unreadable image" in m]) == NAMED
    caplog.clear()
    loader = build_loader(LoaderSpec("torch", str(root), Augmentation(size=16), batch_size=2, num_workers=0),
                          None, "cpu")
    with caplog.at_level(logging.WARNING):
        list(loader)
    assert len([m for m in skip_lines(caplog) if "skipping unreadable image" in m]) <= NAMED
    (line,) = [r.getMessage() for r in caplog.records if "unreadable and skipped so far" in r.getMessage()]
    assert f"{TRUNCATED + EMPTY} of the {TRUNCATED + EMPTY + GOOD} files" in line
    caplog.clear()
    loader = build_loader(LoaderSpec("torch", str(root), Augmentation(size=16), batch_size=2, num_workers=0),
                          None, "cpu")
    with caplog.at_level(logging.WARNING):  # as the trainer reads: its steps, then it leaves the epoch
        batches = iter(loader)
        for _ in range(len(loader)):
            next(batches)
        batches.close()
    (line,) = [r.getMessage() for r in caplog.records if "unreadable and skipped so far" in r.getMessage()]


def test_reason_kinds_leave_out_what_differs_per_file(tmp_path):
    """Reasons of one cause (sizes, byte counts, shapes, names differ) share a kind; causes differ."""
    whole = jpeg_bytes(1, 64)
    reasons = []
    for i, cut in enumerate((len(whole) // 2, len(whole) // 2 - 5, len(whole) - 40)):
        (tmp_path / f"{i}.jpg").write_bytes(whole[:cut])
        reasons.append(check_image(tmp_path / f"{i}.jpg")[0])
    assert all(reasons) and len({reason_kind(r) for r in reasons}) <= 2, reasons
    assert len({reason_kind(f"{w}x{w} = {w * w} pixels, over the limit of 100 (data.max_pixels, --max-pixels)")
                for w in (11, 20)}) == 1
    assert reason_kind("4 channel(s) (shape (9, 8, 4) as (height, width, channels)), data.channels is 1") == \
        reason_kind("a TIFF of 4 bands: this run reads grey images; set data.channels=4 (data.backend=torch) to train "
                    "on every band") == "4 channels, data.channels is 1"
    (tmp_path / "a.jpg").write_text("text")
    (tmp_path / "b.jpg").write_text("more text")
    assert reason_kind(check_image(tmp_path / "a.jpg")[0]) == reason_kind(check_image(tmp_path / "b.jpg")[0])
    assert reason_kind("zero bytes") != reason_kind(reasons[0])
