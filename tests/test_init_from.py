"""model.init_from: continued pre-training from a checkpoint of this project, an exported encoder,
refused for another family, ignored by a resume."""
import subprocess
import sys

import pytest
import torch

from simmim.core.errors import CheckpointError, ConfigError
from simmim.trainer.checkpoint import checkpoints
from simmim.trainer.config import load_config
from simmim.trainer.distributed import DistInfo
from simmim.trainer.export import export
from simmim.trainer.finetune_options import FinetuneConfig
from simmim.trainer.model import build_simmim
from simmim.trainer.pretrain import PretrainTask, init_from, pretrain

from test_train import tiny_overrides

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def source(sample_root, tmp_path_factory):
    """A checkpoint of a short real pre-training run (swin_micro, 64 px, 1 epoch)."""
    out = tmp_path_factory.mktemp("init_from") / "source"
    pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=1", "train.warmup_epochs=0")))
    return checkpoints(out)[-1][1]


def swin_weights(state: dict, prefix: str = "encoder.swin.") -> dict:
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.endswith(("relative_position_index", "attn_mask"))}


def step0_encoder(sample_root, out, init: str) -> dict:
    """The encoder weights `simmim pretrain` starts from (what `fit` builds before step 0)."""
    cfg = load_config("demo", tiny_overrides(sample_root, out, f"model.init_from={init}", "train.seed=7"))
    model, _ = PretrainTask(cfg).build(CPU)
    return swin_weights(model.state_dict())


def test_own_checkpoint_gives_its_encoder_at_step_0(source, sample_root, tmp_path):
    theirs = swin_weights(torch.load(source, map_location="cpu", weights_only=True)["model"])
    ours = step0_encoder(sample_root, tmp_path / "run", str(source))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    fresh = step0_encoder(sample_root, tmp_path / "run", "")  # without it: random weights
    assert not torch.equal(fresh["patch_embed.proj.weight"], theirs["patch_embed.proj.weight"])


def test_exported_folder_gives_the_same_encoder(source, sample_root, tmp_path):
    folder = export(source, tmp_path / "timm")
    theirs = swin_weights(torch.load(source, map_location="cpu", weights_only=True)["model"])
    ours = step0_encoder(sample_root, tmp_path / "run", f"local-dir:{folder}")  # timm's name for it
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_released_simmim_checkpoint(tmp_path):
    """microsoft/SimMIM's layout: the original Swin naming (patch merging at the end of a stage)
    under "encoder.", its (1, 1, C) mask token and decoder beside it, its yacs config."""
    from simmim.trainer.export import swin_original_state_dict

    torch.manual_seed(0)
    theirs = build_simmim("swin_micro", 64, 32, 2)
    state = {f"encoder.{k}": v for k, v in swin_original_state_dict(theirs.encoder.swin).items()}
    state["encoder.mask_token"] = theirs.encoder.mask_token.detach().reshape(1, 1, -1)
    state["decoder.0.weight"], state["decoder.0.bias"] = torch.zeros(3072, 256, 1, 1), torch.zeros(3072)
    released = {"MODEL": {"TYPE": "swin", "SWIN": {"WINDOW_SIZE": 2, "PATCH_SIZE": 4}}, "DATA": {"IMG_SIZE": 64}}
    torch.save({"model": state, "config": released}, tmp_path / "simmim_pretrain.pth")
    torch.manual_seed(1)
    model = build_simmim("swin_micro", 64, 32, 2)
    init_from(model, str(tmp_path / "simmim_pretrain.pth"), "swin_micro", None)
    ours, theirs = swin_weights(model.state_dict()), swin_weights(theirs.state_dict())
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_position_tables_resized_as_fine_tuning_does(source, tmp_path):
    torch.manual_seed(0)
    theirs = build_simmim("swin_micro", 128, 32, 4)  # 7x7 offset tables
    torch.save({"model": theirs.state_dict(), "config": {"model": {"arch": "swin_micro"}}}, tmp_path / "w4.pt")
    model = build_simmim("swin_micro", 128, 32, 8)  # 15x15: interpolated
    init_from(model, str(tmp_path / "w4.pt"), "swin_micro", None)
    ours, theirs = swin_weights(model.state_dict()), swin_weights(theirs.state_dict())
    assert torch.equal(ours["patch_embed.proj.weight"], theirs["patch_embed.proj.weight"])
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert ours[table].shape[0] == 15 * 15 and theirs[table].shape[0] == 7 * 7
    # the source's window 2 (3x3 offsets) cannot be stretched to window 4: one line
    with pytest.raises(CheckpointError, match="model.init_from: .* cannot resize a relative position table"):
        init_from(build_simmim("swin_micro", 128, 32, 4), str(source), "swin_micro", None)


def test_foreign_family_is_one_line(tmp_path, sample_root):
    vit = build_simmim("vit_micro", 64, 32)
    torch.save({"model": vit.state_dict(), "config": {"model": {"arch": "vit_micro"}}}, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="is a vit_micro checkpoint; model.arch is swin_micro"):
        init_from(build_simmim("swin_micro", 64, 32, 2), str(tmp_path / "vit.pt"), "swin_micro", None)
    torch.save(vit.encoder.vit.state_dict(), tmp_path / "bare.pt")  # no record: the weight names tell
    with pytest.raises(CheckpointError, match="holds a vit encoder; model.arch swin_micro is a swin"):
        init_from(build_simmim("swin_micro", 64, 32, 2), str(tmp_path / "bare.pt"), "swin_micro", None)
    out = tmp_path / "run"
    args = ["--config", "demo", *tiny_overrides(sample_root, out, f"model.init_from={tmp_path / 'vit.pt'}")]
    proc = subprocess.run([sys.executable, "-m", "simmim.trainer.cli", "pretrain", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].count("model.init_from") >= 1
    assert "Traceback" not in proc.stderr
    assert not (out / "config.yaml").exists()  # refused before the run folder is written


def test_missing_file_and_finetune_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from is for simmim pretrain"):
        load_config("finetune_demo", [f"model.init_from={tmp_path / 'x.pt'}"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config("demo", ["model.init_from=hf-hub:timm/swin_base_patch4_window7_224"])


def test_resume_ignores_init_from(source, sample_root, tmp_path):
    out = tmp_path / "run"
    pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=1", "train.warmup_epochs=0",
                                                f"model.init_from={source}")))
    assert "model.init_from" in (out / "log.txt").read_text() and "encoder loaded" in (out / "log.txt").read_text()
    vit = build_simmim("vit_micro", 64, 32)  # a resume that read it would stop on another family
    torch.save({"model": vit.state_dict(), "config": {"model": {"arch": "vit_micro"}}}, tmp_path / "vit.pt")
    pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=2", "train.warmup_epochs=0",
                                                f"model.init_from={tmp_path / 'vit.pt'}")))
    log = (out / "log.txt").read_text()
    assert "not read: resuming from" in log
    assert len(checkpoints(out)) >= 2
    # nor does it need the file any more (a downloaded source deleted after the start)
    pretrain(load_config("demo", tiny_overrides(sample_root, out, "train.epochs=2", "train.warmup_epochs=0",
                                                f"model.init_from={tmp_path / 'gone.pt'}")))


def test_dcp_folder_and_swinv2_windows(tmp_path):
    """A DCP checkpoint folder (what train.parallel=fsdp writes; here by the same checkpointer in one
    process) is read gathered: the encoder at window 4 gets its weights, and SwinV2's position bias
    is normalised by the window 2 its config records. A SwinV2 state dict that records no sizes is
    one line naming model.init_from and what to do (it named finetune.pretrained_*, which
    pre-training does not have)."""
    from simmim.trainer.checkpoint import DCPCheckpointer
    from simmim.trainer.checkpoint_reader import is_dcp_checkpoint

    torch.manual_seed(0)
    theirs = build_simmim("swinv2_micro", 64, 32, 2)
    cfg = {"model": {"arch": "swinv2_micro", "window_size": 2}, "data": {"img_size": 64, "mask_patch_size": 32}}
    folder = DCPCheckpointer(tmp_path, True, keep_last=1).save(
        3, theirs, torch.optim.AdamW(theirs.parameters()), {"train_state": {"epoch": 0}, "scaler": {}, "config": cfg})
    assert is_dcp_checkpoint(folder)
    model = build_simmim("swinv2_micro", 128, 32, 4)
    init_from(model, str(folder), "swinv2_micro", None)
    ours, want = swin_weights(model.state_dict()), swin_weights(theirs.state_dict())
    assert set(ours) == set(want)
    for k, v in want.items():
        assert torch.equal(ours[k], v), k
    attn = model.encoder.swin.layers[0].blocks[0].attn
    assert attn.pretrained_window_size == (2, 2) and attn.window_size == (4, 4)

    torch.save(theirs.encoder.swin.state_dict(), tmp_path / "bare.pt")  # no config: the sizes are unknown
    with pytest.raises(CheckpointError) as e:
        init_from(build_simmim("swinv2_micro", 64, 32, 2), str(tmp_path / "bare.pt"), "swinv2_micro", None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.init_from: ") and "finetune." not in msg
    assert "does not record the img_size and window_size" in msg and "point model.init_from at a checkpoint" in msg
