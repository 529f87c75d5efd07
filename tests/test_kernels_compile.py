"""The kernels as a GPU would build them: every specialisation the launchers use goes through
Triton's compiler to an sm_90 (H100) cubin on this CPU machine (`simmim bench compile`). The
interpreter tests check what the kernels compute; this checks that they compile, do not spill,
and read and write the model's layouts with 128-bit accesses only."""
import json
import os
import subprocess
import sys

import pytest

from simmim.kernels import dispatch

# building every specialisation takes a minute or more on 2 cores
pytestmark = [pytest.mark.skipif(not dispatch.HAS_TRITON, reason="Triton is not installed"), pytest.mark.slow]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "simmim.cli", "bench", "compile", "--arch", "90", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "compile-sm90" / "compile.json").read_text())["rows"]


def test_every_specialisation_compiles(compiled):
    assert len(compiled) >= 40 and all(r["ok"] for r in compiled)
    assert {r["kernel"] for r in compiled} == {"_fill_fwd_kernel", "_fill_bwd_kernel", "_loss_fwd_kernel",
                                               "_scale_kernel"}


@pytest.mark.parametrize("case", ["mask_fill fwd swin_b_192 float32", "mask_fill bwd vit_b_224 bfloat16",
                                  "masked_l1 swin_b_192 head channels-last bfloat16",
                                  "masked_l1 vit_b_224 head channels-last bfloat16",
                                  "masked_l1 swin_b_192 pred bfloat16"])
def test_model_layouts_vectorised_without_spills(compiled, case):
    """What the model runs: token rows, and the head's channels-last output read in place (a
    cell's pixels contiguous). Scalar 16-bit accesses would mean an uncoalesced layout."""
    (row,) = [r for r in compiled if r["case"] == case]
    assert row["spill_bytes"] == 0
    for accesses in (row["loads"], row["stores"]):
        assert "v4.b32" in accesses and "b16" not in accesses, (case, row)


def test_interpreter_refused(simmim_cmd, tmp_path):
    r = subprocess.run(simmim_cmd + ["bench", "compile", "--out", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode != 0 and "unset TRITON_INTERPRET" in r.stderr
