"""The one training step on CPU, in each precision branch: fp32, bf16 autocast, fp16 autocast with a
GradScaler, and a non-fused optimizer; a non-finite step is skipped in each."""
import pytest
import torch

from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.engine import EpochHooks, Stop, StepOptions, Trainer
from simmim.trainer.model import build_simmim


def run_epoch(amp_dtype, fused=True, poison_step=None, steps=4):
    """Four steps of vit_micro at 64 px; the loss of step `poison_step` is made NaN. Returns the
    model, its initial weights, the scaler, the trainer, the result and the dtypes the blocks saw."""
    torch.manual_seed(0)
    model = build_simmim("vit_micro", 64, 32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    masks = MaskGenerator(64, 32, 0.6)
    batches = [(torch.randn(2, 3, 64, 64, generator=gen), masks.sample(2, generator=gen)) for _ in range(steps)]
    seen = []
    model.encoder.vit.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    calls = [0]
    forward = model.forward

    def poisoned(*batch):
        loss = forward(*batch)
        calls[0] += 1
        return loss * float("nan") if calls[0] - 1 == poison_step else loss

    model.forward = poisoned
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype is torch.float16, init_scale=2.0 ** 8)
    records = []

    class Hooks(EpochHooks):
        log = staticmethod(records.append)

    trainer = Trainer(model, opt, lambda step: 1e-3, StepOptions(clip_grad=5.0, amp_dtype=amp_dtype, log_every=1),
                      steps_per_epoch=steps, scaler=scaler)
    res = trainer.train_epoch(iter(batches), epoch=0, hooks=Hooks())
    return model, initial, scaler, trainer, res, seen, records


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16])
def test_each_precision_trains(amp_dtype):
    model, initial, scaler, trainer, res, seen, records = run_epoch(amp_dtype)
    assert set(seen) == {amp_dtype or torch.float32}  # autocast on (or off) inside the model
    assert res.steps_done == 4 and res.stopped is Stop.NONE and not res.stopped and torch.isfinite(torch.tensor(res.loss))
    assert all(r["skipped_steps"] == 0 for r in records)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
    assert "encoder.mask_token" in changed and "decoder.0.weight" in changed
    assert scaler.is_enabled() == (amp_dtype is torch.float16)


@pytest.mark.parametrize("amp_dtype,fused", [(None, True), (None, False), (torch.bfloat16, True),
                                             (torch.float16, True)])
def test_nonfinite_step_is_skipped(amp_dtype, fused):
    """A NaN loss at step 0: no weight moves at that step, it is counted, later steps train. With
    fp16 the GradScaler skips it and halves its scale."""
    model, initial, scaler, trainer, res, seen, records = run_epoch(amp_dtype, fused, poison_step=0, steps=1)
    assert [r["skipped_steps"] for r in records] == [1] and int(trainer.skipped) == 1
    assert res.stopped is Stop.NONE  # one skipped step is under max_skipped_streak
    for k, v in model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    if amp_dtype is torch.float16:
        assert scaler.get_scale() == 2.0 ** 7
    model, initial, scaler, trainer, res, seen, records = run_epoch(amp_dtype, fused, poison_step=1)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert torch.isfinite(torch.tensor(res.loss))  # the epoch mean leaves the skipped step out
    assert not torch.equal(model.state_dict()["encoder.mask_token"], initial["encoder.mask_token"])


def test_hooks_save_then_stop():
    """A checkpoint due after step 1 is saved (and the epoch goes on); a stop requested after step 3
    ends the epoch there with Stop.SIGNAL; the loss sum passed to save covers the steps so far."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    batches = [(torch.randn(3, 4), torch.randn(3, 1)) for _ in range(6)]
    model.forward = lambda x, y, f=model.forward: torch.nn.functional.mse_loss(f(x), y)
    saves, steps = [], []

    class Hooks(EpochHooks):
        def log(self, record):
            steps.append(record["step"])

        def checkpoint_due(self):
            return len(steps) == 1 and not saves

        def stop_requested(self):
            return len(steps) == 3

        def save(self, steps_done, loss_sum, good_steps):
            saves.append((steps_done, loss_sum, good_steps))

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda step: 0.1,
                      StepOptions(log_every=1), steps_per_epoch=6)
    res = trainer.train_epoch(iter(batches), epoch=2)
    assert res.stopped is Stop.NONE and res.steps_done == 6  # no hooks: the whole epoch
    res = trainer.train_epoch(iter(batches), epoch=3, hooks=Hooks())
    assert res.stopped is Stop.SIGNAL and bool(res.stopped) and res.steps_done == 3
    assert steps == [18, 19, 20]  # global steps of epoch 3 (6 steps per epoch)
    assert len(saves) == 1 and saves[0][0] == 1 and saves[0][2] == 1 and saves[0][1] > 0
    assert res.good_steps == 3 and res.loss == pytest.approx(res.loss_sum / 3)
