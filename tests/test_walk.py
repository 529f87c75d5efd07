"""A hostile data tree, walked (pipeline/folder.py) and checked (decode/scan): links across classes
and out of the root, non-regular files, second names of one file, list labels. Each case builds
its own input; none decodes more than a few 4x4 images."""
import logging
import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.pipeline import scan_folder
from simmim.pipeline.decode import check_image
from simmim.pipeline.folder import read_file_list
from simmim.pipeline.scan import scan_images


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def names(samples):
    return sorted((os.path.relpath(p, p.split("/root/")[0] + "/root"), label) for p, label in samples)


def test_links_into_other_classes_and_out_of_root_skipped(tmp_path, caplog):
    root = tmp_path / "root"
    png(root / "a" / "1.png")
    png(root / "b" / "2.png")
    png(tmp_path / "outside" / "3.png")  # beside the root: must not enter class a
    (root / "a" / "sibling_b_link").symlink_to("../b")
    (root / "a" / "up").symlink_to("../..")
    (root / "a" / "out").symlink_to(tmp_path / "outside")
    png(root / "a" / "real_sub" / "4.png")
    with caplog.at_level(logging.WARNING):
        samples, classes = scan_folder(root)
    assert classes == ["a", "b"]
    assert names(samples) == [("a/1.png", 0), ("a/real_sub/4.png", 0), ("b/2.png", 1)]
    lines = [r.getMessage() for r in caplog.records]
    assert any("sibling_b_link" in m and "into class folder 'b'" in m for m in lines), lines
    assert any("/a/up'" in m and "outside the data path" in m for m in lines), lines
    assert any("/a/out'" in m and "outside the data path" in m for m in lines), lines


def test_class_folder_linked_from_elsewhere_is_walked(tmp_path):
    """The usual `root/cls -> /big/disk/cls`: the class folder itself may live anywhere, and links
    inside it may stay inside it."""
    png(tmp_path / "disk" / "c" / "1.png")
    png(tmp_path / "disk" / "c" / "deep" / "2.png")
    (tmp_path / "disk" / "c" / "again").symlink_to("deep")  # a second name of a folder: walked once
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "c").symlink_to(tmp_path / "disk" / "c")
    samples, _ = scan_folder(tmp_path / "root")
    assert names(samples) == [("c/1.png", 0), ("c/again/2.png", 0)]


def test_non_regular_files_skipped_everywhere(tmp_path, caplog):
    """A FIFO named x.jpg made the scan block forever in open(); a socket, a link to a device:
    skipped in the walk with one line each, refused by the decode check for a list naming them."""
    cls = tmp_path / "root" / "c"
    png(cls / "ok.png")
    os.mkfifo(cls / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cls / "sock.png"))
    (cls / "urandom.jpg").symlink_to("/dev/urandom")
    (cls / "dangling.jpg").symlink_to(cls / "nothing")
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_folder(tmp_path / "root")
    assert names(samples) == [("c/ok.png", 0)]
    text = caplog.text
    assert "fifo.jpg' (not a regular file: a FIFO)" in text and "a socket" in text
    assert "urandom.jpg' (not a regular file: a character device)" in text and "dangling.jpg" in text
    # a list that names them anyway (the scan, convert and loaders decode by check_image's rule)
    done = {}
    thread = threading.Thread(target=lambda: done.update(
        r=[check_image(cls / n)[0] for n in ("fifo.jpg", "sock.png", "urandom.jpg")]), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "check_image blocked on a FIFO"
    assert done["r"] == ["not a regular file (a FIFO)", "not a regular file (a socket)",
                         "not a regular file (a character device)"]
    result = scan_images([(str(cls / "fifo.jpg"), 0), (str(cls / "ok.png"), 0)], ["c"], workers=1, progress=False)
    assert [p for p, _ in result.good] == [str(cls / "ok.png")] and "FIFO" in result.bad[0][1]
    # the loaders' check of a list (DALI opens files itself): left out before the first epoch
    from simmim.pipeline.scanlist import checked_samples

    lst = tmp_path / "list.txt"
    lst.write_text(f"{cls / 'fifo.jpg'} 0\n{cls / 'ok.png'} 0\n{cls / 'urandom.jpg'} 0\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert checked_samples(str(lst), 1000, 1)[0] == [(str(cls / "ok.png"), 0)]
    assert "left out 2 listed file(s) that are gone or not regular files" in caplog.text
    sock.close()


def test_each_file_once_through_symbolic_links(tmp_path, caplog):
    """A symbolic link to a file listed by its real name, and a second link to it, are left out (the
    real name kept); hard links are names of their own and all listed (the scale benchmark's
    ImageNet-sized trees are hard links to a few hundred JPEGs)."""
    root = tmp_path / "root"
    png(root / "b" / "real.png", 1)
    png(root / "a" / "own.png", 2)
    png(tmp_path / "outside.png", 3)
    (root / "a" / "alias.png").symlink_to(root / "b" / "real.png")  # walked before b/real.png
    (root / "a" / "ext1.png").symlink_to(tmp_path / "outside.png")  # a file outside the tree: listed once
    (root / "a" / "ext2.png").symlink_to(tmp_path / "outside.png")
    os.link(root / "a" / "own.png", root / "a" / "z_hard.png")
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_folder(root)
    assert names(samples) == [("a/ext1.png", 0), ("a/own.png", 0), ("a/z_hard.png", 0), ("b/real.png", 1)]
    assert "left out 2 symbolic link(s)" in caplog.text


def test_list_labels_are_ascii_digits(tmp_path):
    png(tmp_path / "x.png")
    for label in ("\u00b2", "\u0663", "-1", "1.0"):  # superscript two, Arabic-Indic three: str.isdigit() says yes
        lst = tmp_path / "list.txt"
        lst.write_text(f"x.png {label}\n", encoding="utf-8")
        with pytest.raises(DatasetError, match="ASCII digits"):
            read_file_list(lst)
    lst.write_text("x.png 3\n")
    assert read_file_list(lst)[0] == [(str(tmp_path / "x.png"), 3)]


# --- outputs, options and paths checked before any work (no traceback, the user's own names) ---

@pytest.fixture
def tree(tmp_path):
    png(tmp_path / "src" / "c" / "1.png")
    return tmp_path / "src"


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails a test that reaches the decode check (scan) or the listing and decoding (convert's
    single pass decodes in the writer): the error had to come first."""
    import simmim.pipeline.convert as convert_mod
    import simmim.pipeline.scan as scan_mod

    def boom(*a, **k):
        raise AssertionError("the images were checked before the bad output was found")

    monkeypatch.setattr(scan_mod, "scan_images", boom)
    monkeypatch.setattr(convert_mod, "list_samples", boom)
    monkeypatch.setattr(convert_mod, "decode_rgb", boom)


def test_scan_output_checked_first(tree, tmp_path, no_decoding):
    from simmim.pipeline.scanlist import scan_command

    (tmp_path / "file.jpg").write_bytes(b"x")
    for out, expect in ((tmp_path / "file.jpg" / "x.txt", f"{tmp_path / 'file.jpg'} is a file, not a folder"),
                        ("/proc/x.txt", "cannot write --out /proc/x.txt:"), (tmp_path, "is a folder")):
        with pytest.raises(DatasetError) as e:
            scan_command(str(tree), str(out), 1, "skip")
        assert expect in str(e.value) and ".tmp" not in str(e.value) and ".probe" not in str(e.value), e.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.jpg", "src"]  # nothing left behind


def test_convert_output_and_page_size_checked_first(tree, tmp_path, no_decoding):
    from simmim.pipeline.convert import convert

    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"file.jpg/x.beton: .*file.jpg is a file, not a folder$"):
        convert(str(tree), str(tmp_path / "file.jpg" / "x.beton"), progress=False)
    with pytest.raises(DatasetError, match=r"^cannot write /proc/x.beton"):
        convert(str(tree), "/proc/x.beton", progress=False)
    for bad in (3, 1 << 20, 3 << 21, 1 << 32):
        with pytest.raises(DatasetError, match=f"--page-size must be a power of two .* got {bad}$"):
            convert(str(tree), str(tmp_path / "ok.beton"), page_size=bad, progress=False)


def test_beton_given_to_the_wrong_backend(tmp_path):
    from simmim.pipeline import Augmentation, LoaderSpec, build_loader

    beton = tmp_path / "train.beton"
    beton.write_bytes(bytes(range(256)) * 64)
    for backend in ("torch", "dali"):
        with pytest.raises(DatasetError, match=r"is an FFCV .beton: use data.backend=ffcv$"):
            build_loader(LoaderSpec(backend, str(beton), Augmentation(size=8), 1, 0), None, "cpu")
    with pytest.raises(DatasetError, match=r"use data.backend=ffcv\)$"):
        scan_folder(beton)
    (tmp_path / "blob.bin").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(DatasetError, match="is a binary file, not a class folder or a `path label` list$"):
        scan_folder(tmp_path / "blob.bin")


def test_max_pixels_rejected_before_the_run_folder_is_written(tmp_path):
    from simmim.trainer.config import load_config
    from simmim.trainer.loop import fit
    from simmim.trainer.pretrain import PretrainTask

    from simmim.core.errors import ConfigError

    overrides = [f"run.out_dir={tmp_path / 'run'}", "data.max_pixels=0", "train.device=cpu"]
    with pytest.raises(ConfigError, match=r"^data.max_pixels must be an integer in 1\.\.\d+ .*got 0$"):
        load_config(None, overrides)  # at load, with every other value
    cfg = load_config(None, overrides[:1] + overrides[2:])
    cfg.data.max_pixels = 0  # a config built in code still stops before the run folder (fit checks it first)
    with pytest.raises(ConfigError, match=r"^data.max_pixels must be an integer in 1\.\.\d+ .*got 0$"):
        fit(cfg, PretrainTask(cfg))
    assert not (tmp_path / "run").exists()


def test_a_killed_writer_says_what_to_do(tmp_path):
    pytest.importorskip("ffcv")
    from simmim.pipeline.ffcv_writer import CheckedWriter, WriterFailed

    class Killed:
        exitcode = -9

    with pytest.raises(WriterFailed, match=r"exit code -9\) \(killed by the system: most likely out of memory\); "
                                           r"lower --workers"):
        CheckedWriter._raise_if_failed(type("W", (), {"error_dir": tmp_path})(), [Killed()])
