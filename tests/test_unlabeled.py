"""Unlabeled data for pre-training: a folder with images directly in it (any nesting below) or a
list of bare paths is a data set for `simmim pretrain`, `scan` and `convert` in every backend;
fine-tuning refuses it in one line. Each test builds its own images."""
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from simmim.core.errors import DatasetError
from simmim.pipeline.folder import read_file_list, scan_folder
from simmim.pipeline.scan import write_file_list
from simmim.pipeline.scanlist import scan_command
from simmim.trainer.config import load_config
from simmim.trainer.pretrain import pretrain

TINY = ["data.val_path=", "data.img_size=64", "data.batch_size=4", "model.arch=swin_micro", "model.window_size=2",
        "run.progress=false", "run.vis_every=100", "train.epochs=1", "train.warmup_epochs=0", "train.device=cpu"]


def jpeg(path, seed: int, size=(80, 72)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def flat(tmp_path):
    """8 images directly in one folder."""
    for i in range(8):
        jpeg(tmp_path / "flat" / f"img{i}.jpg", i)
    return tmp_path / "flat"


@pytest.fixture
def nested(tmp_path):
    """An image at the top and 7 in sub-folders of any depth (a/, a/b/c/, d/)."""
    jpeg(tmp_path / "nested" / "top.jpg", 0)
    for i, sub in enumerate(["a", "a", "a/b/c", "a/b/c", "d", "d", "d"]):
        jpeg(tmp_path / "nested" / sub / f"p {i + 1}.jpg", i + 1)
    return tmp_path / "nested"


def test_folders_and_bare_lists_are_unlabeled_and_announced(flat, nested, tmp_path):
    said = []
    samples, classes = scan_folder(flat, announce=said.append)
    assert classes == [] and len(samples) == 8 and set(samples.labels.tolist()) == {0}
    samples, classes = scan_folder(nested, announce=said.append)
    assert classes == [] and len(samples) == 8
    assert {p.split("/nested/")[1] for p, _ in samples} >= {"top.jpg", "a/b/c/p 3.jpg", "d/p 7.jpg"}
    (tmp_path / "bare.txt").write_text("# unlabeled\n" + "".join(f"{p}\n" for p, _ in samples))
    listed, classes = scan_folder(tmp_path / "bare.txt", announce=said.append)
    assert classes == [] and list(listed) == list(samples)
    assert said == [f"{flat}: 8 images in 1 folder, unlabeled (images in the top folder itself: one set, for pre-training)",
                    f"{nested}: 8 images in 5 folders, unlabeled (images in the top folder itself: one set, for pre-training)",
                    f"{tmp_path / 'bare.txt'}: a list of 8 images, unlabeled (bare paths)"]
    # a folder of class folders stays labelled (fine-tuning's layout)
    for i, cls in enumerate(["x", "y"]):
        jpeg(tmp_path / "classes" / cls / "i.jpg", i)
    samples, classes = scan_folder(tmp_path / "classes", announce=said.append)
    assert classes == ["x", "y"] and samples.labels.tolist() == [0, 1]
    assert said[-1].endswith("2 images in 2 folders, 2 class folders (fine-tuning's labels; pre-training ignores them)")


def test_bare_list_round_trips_any_name(tmp_path):
    names = ["plain.jpg", "with space 12", "tab\there 3.5", "line\nbreak.png", "#hash.jpg", " lead.jpg", "trail 7 ",
             "ends 42"]
    paths = [str(jpeg(tmp_path / n, i)) for i, n in enumerate(names)]
    write_file_list(tmp_path / "list.txt", [(p, 0) for p in paths], labeled=False)
    text = (tmp_path / "list.txt").read_text()
    assert " 0\n" not in text and "ends\\x2042\n" in text  # bare paths; a trailing number never reads as a label
    samples, classes = read_file_list(tmp_path / "list.txt")
    assert classes == [] and [p for p, _ in samples] == paths


def test_a_list_is_labelled_or_bare_throughout(tmp_path):
    jpeg(tmp_path / "a.jpg", 0)
    (tmp_path / "mixed.txt").write_text("a.jpg\na.jpg 3\n")
    with pytest.raises(DatasetError, match=r"mixed.txt:2: a `path label` line in a list of bare paths"):
        read_file_list(tmp_path / "mixed.txt")
    (tmp_path / "mixed.txt").write_text("a.jpg 3\na.jpg\n")
    with pytest.raises(DatasetError, match=r"mixed.txt:2: expected '<path> <label>'"):
        read_file_list(tmp_path / "mixed.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"has no images and no class folders"):
        scan_folder(tmp_path / "empty")


def test_scan_writes_a_bare_list_every_backend_reads(nested, capsys):
    result = scan_command(str(nested), None, workers=1, on_error="skip")
    out = nested.parent / "nested.clean.txt"
    assert len(result.good) == 8 and json.loads((nested.parent / "nested.clean.classes.json").read_text()) == []
    assert all(not line.rsplit(" ", 1)[-1].isdigit() for line in out.read_text().splitlines())
    assert "8 images in 5 folders, unlabeled" in capsys.readouterr().out
    samples, classes = read_file_list(out)
    assert classes == [] and len(samples) == 8


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_pretrain_torch_from_a_flat_folder_or_a_bare_list(kind, flat, tmp_path):
    (tmp_path / "bare.txt").write_text("".join(f"{p}\n" for p in sorted(flat.iterdir())))
    for src in [flat if kind == "folder" else tmp_path / "bare.txt"]:
        out = tmp_path / "run"
        summary = pretrain(load_config("demo", [f"data.path={src}", f"run.out_dir={out}", "data.num_workers=0", *TINY]))
        assert len(summary["epochs"]) == 1 and np.isfinite(summary["epochs"][0]["loss"])
        log = (out / "log.txt").read_text()
        assert list(out.glob("checkpoint-*.pt")) and f"{src}: " in log and "data torch: 8 images (unlabeled)" in log


def test_finetune_refuses_unlabeled_data(flat, tmp_path):
    from simmim.trainer.finetune import finetune
    from simmim.trainer.finetune_options import FinetuneConfig

    cfg = load_config("finetune_demo", [f"data.path={flat}", f"finetune.val_path={flat}", f"run.out_dir={tmp_path / 'ft'}",
                                        "data.num_workers=0", *TINY[1:]], FinetuneConfig)
    with pytest.raises(DatasetError, match=r"is unlabeled .*fine-tuning and evaluation need labels: class folders"):
        finetune(cfg)
    assert not (tmp_path / "ft" / "config.yaml").exists()


def test_probe_says_it_needs_labels_before_the_batch_size(flat, tmp_path):
    """8 unlabeled images and a batch of 16: the one line names the folder and the labels it lacks
    (it said "do not fill one batch of 16: lower data.batch_size", which would not have helped)."""
    import sys

    out = tmp_path / "probe"
    args = ["probe", "", "--config", "probe_demo", f"data.path={flat}", f"run.out_dir={out}", "probe.val_path=",
            "data.num_workers=0", *TINY[1:], "data.batch_size=16"]
    proc = subprocess.run([sys.executable, "-m", "simmim.trainer.cli", *args], capture_output=True, text=True,
                          timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"'{flat}' is unlabeled" in last and "linear probing" in last and "class folders" in last, last
    assert "batch" not in proc.stderr
    assert not (out / "config.yaml").exists()


@pytest.mark.slow
def test_pretrain_ffcv_from_a_converted_unlabeled_folder(nested, tmp_path):
    pytest.importorskip("ffcv")
    from simmim.pipeline.convert import convert, format_inspect, inspect

    report = convert(str(nested), str(tmp_path / "n.beton"), workers=1, progress=False)
    assert report["images"] == 8 and json.loads((tmp_path / "n.classes.json").read_text()) == []
    assert "8 samples" in format_inspect(inspect(str(tmp_path / "n.beton"), workers=1))
    assert "unlabeled" in format_inspect(inspect(str(tmp_path / "n.beton"), decode=False))
    out = tmp_path / "run"
    summary = pretrain(load_config("demo", ["data.backend=ffcv", f"data.path={tmp_path / 'n.beton'}",
                                            f"run.out_dir={out}", "data.num_workers=1", *TINY]))
    assert len(summary["epochs"]) == 1 and np.isfinite(summary["epochs"][0]["loss"])
    assert "data ffcv: 8 images (unlabeled)" in (out / "log.txt").read_text()


@pytest.mark.slow
def test_pretrain_dali_from_an_unlabeled_folder(nested, tmp_path, simmim_cmd):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    proc = subprocess.run([*simmim_cmd, "pretrain", "--config", "demo", "data.backend=dali", f"data.path={nested}",
                           f"run.out_dir={out}", "data.num_workers=1", *TINY], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 images in 5 folders, unlabeled" in proc.stdout + proc.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
