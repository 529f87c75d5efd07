"""The adapters around foreign private APIs still find what they rely on (FFCV's are checked on a
live loader in test_ffcv.py)."""
import copy

import pytest
import torch

from simmim.trainer.compat import reads_found_inf, skip_nonfinite_step


def adamw_after_steps(fused: bool, flags: list[float]):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05, fused=fused or None)
    for flag in flags:
        model(torch.randn(2, 4)).square().sum().backward()
        skip_nonfinite_step(opt, torch.tensor(flag))
        opt.zero_grad(set_to_none=True)
    return model, opt


def test_fused_adamw_reads_found_inf_on_the_device():
    """torch's private contract: a fused AdamW's step reads `found_inf` and, when set, changes
    neither the parameters nor the moments nor the step count."""
    model, opt = adamw_after_steps(True, [0.0])
    assert reads_found_inf(opt) and not hasattr(opt, "found_inf")  # the adapter cleans up
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model(torch.randn(2, 4)).square().sum().backward()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    after = (model.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k
    for p, state in before[1]["state"].items():
        for k, v in state.items():
            assert torch.equal(after[1]["state"][p][k], v), k
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(model.weight, before[0]["weight"])


@pytest.mark.parametrize("flags", [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
def test_non_fused_adamw_skips_the_same_steps(flags):
    """The host-side fallback for optimizers without the flag gives the fused path's result."""
    fused, f_opt = adamw_after_steps(True, flags)
    plain, p_opt = adamw_after_steps(False, flags)
    assert not reads_found_inf(p_opt)
    torch.testing.assert_close(plain.state_dict(), fused.state_dict(), rtol=1e-6, atol=1e-7)
    steps = [float(s["step"]) for s in p_opt.state_dict()["state"].values()]
    assert steps == [flags.count(0.0)] * 2
    assert [float(s["step"]) for s in f_opt.state_dict()["state"].values()] == steps
