"""simmim export: the encoder in timm's local-dir layout and in the original Swin layout."""
import pytest
import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from simmim.trainer.checkpoint import checkpoints, save_checkpoint
from simmim.trainer.config import load_config
from simmim.trainer.export import ExportError, export
from simmim.trainer.model import build_simmim
from simmim.trainer.pretrain import pretrain

from test_train import tiny_overrides


@pytest.fixture(scope="module")
def run_dir(sample_root, tmp_path_factory):
    """A short real pre-training run (swin_micro, 64 px, 2 epochs) with a validation set."""
    out = tmp_path_factory.mktemp("export") / "run"
    pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=2", "train.warmup_epochs=0",
                                                f"data.val_path={sample_root / 'val'}", "run.val_every=1",
                                                "run.log_every=2", "run.vis_every=1")))
    return out


@pytest.fixture(scope="module")
def trained(run_dir):
    return checkpoints(run_dir)[-1][1]


def our_features(ckpt, images):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    c = state["config"]
    model = build_simmim(c["model"]["arch"], c["data"]["img_size"], c["data"]["mask_patch_size"],
                         c["model"]["window_size"]).eval()
    model.load_state_dict(state["model"])
    masks = torch.zeros(images.shape[0], images.shape[2] // 32, images.shape[3] // 32, dtype=torch.bool)
    with torch.no_grad():
        return model.encoder(images, masks)  # (B, C, h, w)


def test_timm_local_dir_gives_the_same_features(trained, tmp_path):
    out = export(trained, tmp_path / "timm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # no missing key, or timm raises
    assert net.num_classes == 0
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = net.forward_features(images).permute(0, 3, 1, 2)  # Swin: (B, h, w, C)
    ours = our_features(trained, images)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_swin_layout_converts_back_through_timms_own_filter(trained, tmp_path):
    out = export(trained, tmp_path / "swin", fmt="swin")
    sd = torch.load(out / "swin_encoder.pth", map_location="cpu", weights_only=True)["model"]
    # the original layout: patch merging at the end of stages 0..2, index buffers present, no head
    assert "layers.0.downsample.reduction.weight" in sd and not any(k.startswith("layers.3.downsample") for k in sd)
    assert any(k.endswith("relative_position_index") for k in sd) and not any(k.startswith("head") for k in sd)
    net = timm.create_model(f"local-dir:{export(trained, tmp_path / 'timm')}", pretrained=False).eval()
    result = net.load_state_dict(checkpoint_filter_fn({"model": sd}, net), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "relative_position_index" not in k]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(images).permute(0, 3, 1, 2), our_features(trained, images),
                                   rtol=0, atol=1e-5)


def test_refuses_what_it_cannot_export(trained, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope.pt", tmp_path / "o1")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="is not a checkpoint"):
        export(tmp_path / "junk.pt", tmp_path / "o2")
    state = torch.load(trained, map_location="cpu", weights_only=True)
    finetuned = {"model": {k.removeprefix("encoder.swin."): v for k, v in state["model"].items()
                           if k.startswith("encoder.swin.")}, "config": state["config"]}
    save_checkpoint(tmp_path / "ft", 1, finetuned)
    with pytest.raises(ExportError, match="fine-tuned"):
        export(checkpoints(tmp_path / "ft")[-1][1], tmp_path / "o3")
    export(trained, tmp_path / "o4")
    with pytest.raises(ExportError, match="exists"):
        export(trained, tmp_path / "o4")
    with pytest.raises(ExportError, match="format"):
        export(trained, tmp_path / "o5", fmt="onnx")
    with pytest.raises(ExportError, match="is a folder"):
        export(trained.parent, tmp_path / "o6")


def test_force_replaces_only_a_previous_export(trained, tmp_path, monkeypatch):
    """--force never deletes what is not an export: a run folder, the current folder, a file."""
    import json
    import os
    import shutil

    run = tmp_path / "runcopy"
    shutil.copytree(trained.parent, run)
    before = sorted(p.name for p in run.iterdir())
    ckpt = run / trained.name
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export(ckpt, run, force=True)
    with pytest.raises(ExportError, match="holds the checkpoint"):
        export(ckpt, tmp_path, force=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="more than a previous export"):
        export(ckpt, other, force=True)
    monkeypatch.chdir(other)
    with pytest.raises(ExportError, match="current folder"):
        export(ckpt, ".", force=True)
    with pytest.raises(ExportError, match="is a file"):
        export(ckpt, other / "precious.txt", force=True)
    assert sorted(p.name for p in run.iterdir()) == before and (other / "precious.txt").read_text() == "keep me"
    out = export(ckpt, tmp_path / "exp")
    assert export(ckpt, tmp_path / "exp", force=True) == out  # a previous export is replaced
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["tag"] == "simmim" and cfg["crop_pct"] == 0.875


def test_run_folder_has_curves_tensorboard_and_validation(run_dir, tmp_path):
    """A short run leaves curves.png, TensorBoard events (read back with TensorBoard's own reader)
    with the step scalars, the validation loss and the reconstruction image, and val_loss records."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simmim.trainer.monitor import plot_runs

    out = run_dir
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 5 for v in val)
    assert all(0 <= r["data_wait"] <= 1 for r in records if "loss" in r)
    assert (out / "curves.png").stat().st_size > 10_000
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/img_per_s", "perf/data_wait_share",
            "train/epoch_loss", "val/loss"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("val/loss")] == pytest.approx(val)
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in records if "loss" in r]
    assert "reconstruction" in tags["images"] and len(acc.Images("reconstruction")) == 2
    png = plot_runs([out, out], tmp_path / "both.png")
    assert png.stat().st_size > 10_000


def test_wandb_offline_logs_the_same_scalars(tmp_path, monkeypatch):
    """run.wandb=true with WANDB_MODE=offline: no network, a W&B run file holding the scalars; a
    second monitor on the same folder (a resumed run) continues the same W&B run id."""
    pytest.importorskip("wandb")
    from simmim.trainer.monitor import RunMonitor

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = RunMonitor(tmp_path, True, tensorboard=False, wandb=True, config={"model": {"arch": "swin_micro"}})
    m.log({"step": 1, "loss": 0.5, "lr": 1e-3})
    m.log({"step": 3, "epoch_loss": 0.45, "val_loss": 0.4})
    m.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    [run_file] = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    import time

    for _ in range(60):  # W&B's service process writes the records to the file after finish() returns
        data = run_file.read_bytes()
        if b"train/epoch_loss" in data:
            break
        time.sleep(0.5)
    assert b"val/loss" in data and b"train/loss" in data and b"train/epoch_loss" in data
    RunMonitor(tmp_path, True, tensorboard=False, wandb=True, resume_step=3).close()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
