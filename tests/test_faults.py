"""Runs that survive the user's own world (issue 28): a run folder that cannot be written (before
or during the run), a resume onto a data set that changed, leftovers of a killed run, Ctrl-C.

A folder is made unwritable the way a user's world does it: `chattr +i` (immutable: as root,
permission bits stop nothing) where the test runs as root and chattr works, else chmod 0o555; a
full disk is an OSError(ENOSPC) raised by the write itself (a test hook)."""
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from simmim.pipeline.errors import ConfigError, UserError
from simmim.pipeline.io import check_folder_writable
from simmim.trainer import loop
from simmim.trainer import pretrain as pretrain_mod
from simmim.trainer import visualize
from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.config import load_config
from simmim.trainer.pretrain import pretrain

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "model.arch=swin_micro",
        "model.window_size=2", "run.progress=false", "run.vis_every=100", "train.warmup_epochs=1",
        "run.log_every=1"]


def cfg_for(sample_root, out, *extra):
    return load_config("demo", [f"data.path={sample_root / 'train'}", f"run.out_dir={out}", *TINY, *extra])


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` cannot take new files (nor lose any) inside the block, whoever the test runs as."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not _chattr("+i", folder):
            pytest.skip("running as root without a working chattr: no way to make a folder unwritable")
        try:
            yield
        finally:
            _chattr("-i", folder)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


def test_unwritable_run_folder_is_one_line_before_anything_is_built(sample_root, tmp_path, monkeypatch):
    """Before: a 20-line PermissionError traceback from the lock file (or from mkdir, for a run
    folder to be made inside an unwritable one). After: one ConfigError naming run.out_dir, raised
    before the model or the loaders are built, and nothing written."""
    def build(*a, **kw):
        raise AssertionError("built before run.out_dir was checked")

    monkeypatch.setattr(pretrain_mod.PretrainTask, "build", build)
    frozen = tmp_path / "frozen"
    with unwritable(frozen):
        for out in (frozen, frozen / "run" / "inner"):
            with pytest.raises(ConfigError, match=r"run\.out_dir .* cannot be written") as e:
                pretrain(cfg_for(sample_root, out, "train.epochs=1"))
            assert "\n" not in str(e.value)
        assert list(frozen.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        pretrain(cfg_for(sample_root, tmp_path / "a-file" / "run", "train.epochs=1"))


def test_check_folder_writable_leaves_nothing_and_makes_no_folder(tmp_path):
    assert check_folder_writable(tmp_path / "a" / "b", "x") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    with unwritable(tmp_path / "ro"):
        with pytest.raises(UserError, match="'.*ro' cannot be written"):
            check_folder_writable(tmp_path / "ro", "x")


def test_folder_made_unwritable_mid_run_keeps_the_checkpoint(sample_root, tmp_path, monkeypatch):
    """The run folder turns unwritable at the epoch's end, after the training steps. Before:
    the figure (then curves.png) write raised first, a 58-line traceback, and the epoch's
    checkpoint was never written. After: the checkpoint is written first; the figure and the
    curves that cannot be written are warnings, and the run ends normally."""
    out = tmp_path / "run"
    after_epoch = pretrain_mod.PretrainTask.after_epoch
    frozen = contextlib.ExitStack()

    def freeze_then(self, model, epoch, last, *a, **kw):
        if last:
            frozen.enter_context(unwritable(out))
        return after_epoch(self, model, epoch, last, *a, **kw)

    monkeypatch.setattr(pretrain_mod.PretrainTask, "after_epoch", freeze_then)
    with frozen:
        summary = pretrain(cfg_for(sample_root, out, "train.epochs=1"))
    assert [s for s, _ in checkpoints(out)] == [7] and len(summary["epochs"]) == 1
    text = (out / "log.txt").read_text()  # (an open file is still written in an immutable folder)
    assert "cannot write" in text and "reconstruction.png" in text and "curves.png" in text


def test_failing_soft_writes_are_warnings_never_the_end_of_the_run(sample_root, tmp_path, monkeypatch):
    """A full disk for everything but the checkpoints: figures, curves, TensorBoard, metrics.jsonl
    each say so once (not once per record) and every checkpoint is written."""
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(visualize, "atomic_write", full)
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    monkeypatch.setattr(loop.MetricsLog, "__call__", full)
    out = tmp_path / "run"
    summary = pretrain(cfg_for(sample_root, out, "train.epochs=1"))
    assert [s for s, _ in checkpoints(out)] == [7] and len(summary["epochs"]) == 1
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if " cannot write " in line]
    for what in ("metrics.jsonl", "TensorBoard events", "curves.png", "reconstruction.png"):  # 8 records, 1 warning
        written = [w.split(" cannot write ", 1)[1] for w in warnings]
        assert sum(w.startswith(what) or w.startswith(str(out / what)) for w in written) == 1, (what, warnings)


def test_log_file_that_fails_is_said_once(tmp_path, capsys):
    handler = loop.RunLogFile(tmp_path / "log.txt")
    logger = logging.getLogger("simmim.test_faults")
    logger.addHandler(handler)
    try:
        handler.stream.close()
        handler.stream = open(os.devnull, "w")

        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.stream.write = full
        for _ in range(3):
            logger.warning("a record")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left" in err and "Traceback" not in err
