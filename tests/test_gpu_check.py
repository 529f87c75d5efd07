"""benchmarks/gpu_check.sh must work the first time on a lent GPU machine: its dry run
(GPU_CHECK_DRY_RUN=1) runs every step on the CPU at tiny sizes through the same commands, so a
broken step, flag or output shows here. Also: the budget holds when a step hangs, a stopped step
takes what it started with it, at most 8 files come back, and DALI's wheels are checked on arrival
and refused when a part is truncated."""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from simmim.benchmarks import gpu_summary

REPO = Path(__file__).resolve().parents[1]
MAIN_STEPS = ["tests: kernels", "bench kernels", "bench step bf16", "bench step data wait (torch)", "bench claims",
              "bench loaders", "bench step PixelShuffle", "bench memory", "bench step bf16 compiled ViT-B",
              "bench step bf16 compiled Swin-B"]
DALI_STEPS = ["wheels: verify, join, install", "dali: import", "bench loaders (dali)", "bench step data wait (dali)"]


def run_script(script: str, out: Path, timeout: float, *args: str,
               **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", **env}
    full.pop("CUDA_VISIBLE_DEVICES", None)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / script), *args], env=full, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def steps_of(out: Path, suffix: str = "") -> list[list[str]]:
    with tarfile.open(out / f"gpu_check{suffix}.tar.gz") as tar:
        tsv = tar.extractfile("results/steps.tsv").read().decode()
    return [line.split("\t") for line in tsv.splitlines()]


def check_outputs(out: Path, proc: subprocess.CompletedProcess, suffix: str = "") -> str:
    """Exactly the log and the archive (well under the 8 files that come back); the log's first
    line names versions, GPU, /dev/shm and CPUs; the summary is printed last, in the log too."""
    assert sorted(p.name for p in out.rglob("*")) == [f"gpu_check{suffix}.log", f"gpu_check{suffix}.tar.gz"]
    log = (out / f"gpu_check{suffix}.log").read_text()
    first = log.splitlines()[0]
    assert first.startswith(f"gpu_check part={'dali' if suffix else 'main'} dry_run=1")
    for word in ("torch ", "triton ", "timm ", "numpy ", "GPU: ", "/dev/shm ", "CPUs "):
        assert word in first
    summary = proc.stdout[proc.stdout.index("================ gpu_check summary"):]
    assert log.rstrip().endswith(summary.rstrip())
    return summary


def fake_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, large enough to be split into several transfer parts."""
    folder.mkdir(parents=True)
    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    files = {"gpu_check_probe/__init__.py": "VALUE = 42\n" + "# padding\n" * 60,
             "gpu_check_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
             "gpu_check_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "gpu_check_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, "gpu_check_probe-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return path


@pytest.fixture
def batches(tmp_path) -> Path:
    """gpu_wheels.sh prepare from a local folder (no index): the probe wheel, pinned by sha256, split
    into 300-byte parts, one batch (transfer) each."""
    wheel = fake_wheel(tmp_path / "index")
    reqs = tmp_path / "reqs.txt"
    reqs.write_text(f"gpu-check-probe==1.0 --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n")
    proc, _ = run_script("gpu_wheels.sh", tmp_path, 120, "prepare", PIP_NO_INDEX="1",
                         PIP_FIND_LINKS=str(wheel.parent), GPU_WHEELS_REQUIREMENTS=str(reqs),
                         GPU_WHEELS_OUT=str(tmp_path / "whl"), GPU_WHEELS_PART_BYTES="300")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "whl"
    assert len(list(out.glob("batch-*/*.part-*"))) >= 3 and len(list(out.glob("batch-*"))) >= 2
    return out


def receive_all(batches: Path, parts: Path) -> None:
    for b in sorted(batches.glob("batch-*")):
        proc, _ = run_script("gpu_wheels.sh", parts, 60, "receive", str(b), WHEEL_PARTS=str(parts))
        assert proc.returncode == 0 and "sha256 OK" in proc.stdout, proc.stderr


def test_wheel_parts_checked_on_arrival_and_truncated_join_refused(tmp_path, batches):
    parts, site = tmp_path / "parts", tmp_path / "site"
    first = sorted(batches.glob("batch-*"))[0]
    part = next(first.glob("*.part-*"))
    part.write_bytes(part.read_bytes()[:-1])  # truncated in transfer
    proc, _ = run_script("gpu_wheels.sh", parts, 60, "receive", str(first), WHEEL_PARTS=str(parts))
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr and not parts.exists()
    proc, _ = run_script("gpu_wheels.sh", parts, 60, "install", WHEEL_PARTS=str(parts), SITE=str(site))
    assert proc.returncode == 1 and "send the batches first" in proc.stderr

    for b in sorted(batches.glob("batch-*"))[1:]:  # all but the first batch arrive intact
        proc, _ = run_script("gpu_wheels.sh", parts, 60, "receive", str(b), WHEEL_PARTS=str(parts))
        assert proc.returncode == 0
    proc, _ = run_script("gpu_wheels.sh", parts, 60, "install", WHEEL_PARTS=str(parts), SITE=str(site))
    assert proc.returncode == 1 and "missing" in proc.stderr and not site.exists()
    for f in first.iterdir():  # the first batch copied without receive: its truncated part slips in
        (parts / f.name).write_bytes(f.read_bytes())
    proc, _ = run_script("gpu_wheels.sh", parts, 60, "install", WHEEL_PARTS=str(parts), SITE=str(site))
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr and not site.exists()


def test_budget_holds_when_a_step_hangs_and_its_processes_die(tmp_path):
    """A step that never ends is stopped at what is left of the budget, with what it started (here a
    child that ignores TERM, so KILL follows); the steps after it are SKIPPED; the table still prints."""
    pidfile = tmp_path / "child.pid"
    hang = f"sh -c 'trap \"\" TERM; exec sleep 300' & echo $! > {pidfile}; sleep 300"
    budget = 12
    proc, took = run_script("gpu_check.sh", tmp_path / "out", 120, GPU_CHECK_BUDGET=str(budget),
                            GPU_CHECK_DRY_SLACK="1", GPU_CHECK_INJECT=hang)
    assert proc.returncode == 1  # a step failed
    summary = check_outputs(tmp_path / "out", proc)
    steps = steps_of(tmp_path / "out")
    assert [s[0] for s in steps] == ["injected"] + MAIN_STEPS
    assert steps[0][1] == "FAILED" and "stopped at its" in steps[0][3]
    assert all(s[1] == "SKIPPED" for s in steps[1:])
    assert "injected" in summary and summary.count("SKIPPED") == len(MAIN_STEPS)
    # the budget covers the steps; the summary after them fits the reserve, KILL comes 5 s after TERM
    assert took < budget + 5 + 15, took
    pid = int(pidfile.read_text())
    state = Path(f"/proc/{pid}/status")
    assert not state.exists() or "zombie" in state.read_text(), "the step's child outlived it"


def test_a_kill_before_the_limit_is_not_called_the_limit(tmp_path):
    """rc 137 is also what the kernel's OOM killer leaves: a step killed by SIGKILL well before its
    limit must say so, not "stopped at its limit"."""
    proc, _ = run_script("gpu_check.sh", tmp_path / "out", 60, GPU_CHECK_BUDGET="10", GPU_CHECK_MIN_STEP="6",
                         GPU_CHECK_DRY_SLACK="1", GPU_CHECK_INJECT="sleep 2; kill -KILL $$")
    assert proc.returncode == 1
    check_outputs(tmp_path / "out", proc)
    injected = steps_of(tmp_path / "out")[0]
    assert injected[:2] == ["injected", "FAILED"], injected
    assert "killed by SIGKILL (rc 137)" in injected[3] and "OOM" in injected[3] and "stopped at" not in injected[3]


def test_dry_run_budget_counts_cpu_seconds_not_the_machines_load(tmp_path):
    """Waiting costs a dry run no budget: a step that sleeps (as a step does while other work holds
    the CPUs) past the budget's wall seconds still ends OK, within the budget x slack wall limit;
    the steps after it stop at that limit. (Counted in wall seconds, it was stopped at 3 s.)"""
    budget, slack = 6, 2
    proc, took = run_script("gpu_check.sh", tmp_path / "out", 120, GPU_CHECK_BUDGET=str(budget),
                            GPU_CHECK_DRY_SLACK=str(slack), GPU_CHECK_INJECT="sleep 4")
    steps = steps_of(tmp_path / "out")
    assert steps[0][:2] == ["injected", "OK"], steps[0]
    assert took < budget * slack + 5 + 15, took
    assert f"CPU s of the {budget} s budget" in check_outputs(tmp_path / "out", proc)


def dry_run_timeout(budget: int, slack: int = 6) -> int:
    """The test's own limit, past the script's (budget x slack wall seconds, then KILL 5 s after
    TERM, and the summary): only a script that ignores its own limits trips it, never a slow machine."""
    return budget * slack + 180


@pytest.mark.slow
def test_dry_run_every_step(tmp_path, batches):
    """Both calls, dry: every step OK, the figures read back from the benchmarks' JSON. The default
    budget is counted in CPU seconds (the steps' own), so a loaded machine takes longer, never fails."""
    out = tmp_path / "out"
    proc, took = run_script("gpu_check.sh", out, dry_run_timeout(300))
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = check_outputs(out, proc)
    steps = steps_of(out)
    assert [s[0] for s in steps] == MAIN_STEPS and all(s[1] == "OK" for s in steps), steps
    for figure in ("tests (pytest-kernels.xml): 2 passed", "kernels on CPU", "6/6 checks ok", "training step on",
                   "vit_micro 128", "torch", "claims on", "SimMIM", "loaders on"):
        assert figure in summary, figure
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "loader workers: 1 (CPUs 1; /dev/shm" in (out / "gpu_check.log").read_text()
    for pattern in ("kernels.json", "step-bf16-auto-synthetic.json", "step-bf16-compiled-auto-synthetic-vit_micro.json",
                    "step-bf16-compiled-auto-synthetic-swin_mini.json",
                    "step-bf16-auto-loader.json", "claims.json", "loaders-synthetic8.json", "pytest-kernels.xml",
                    "summary.txt"):
        assert any(n.endswith(pattern) for n in names), pattern

    parts = tmp_path / "parts"
    receive_all(batches, parts)
    dali_out = tmp_path / "dali"
    proc, took_dali = run_script("gpu_check.sh", dali_out, dry_run_timeout(300), GPU_CHECK_PART="dali",
                                 WHEEL_PARTS=str(parts))
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = check_outputs(dali_out, proc, "-dali")
    steps = steps_of(dali_out, "-dali")
    assert [s[0] for s in steps] == DALI_STEPS and all(s[1] == "OK" for s in steps), steps
    log = (dali_out / "gpu_check-dali.log").read_text()
    assert "joined gpu_check_probe-1.0-py3-none-any.whl" in log and "installed 1 wheels" in log
    assert "nvidia-dali" in log.splitlines()[0] and "dali" in summary
    print(f"dry run: main {took:.0f} s, dali {took_dali:.0f} s (wall)")


def test_summary_reads_gpu_kernel_figures(tmp_path):
    """The kernels block as a GPU run writes it: GB/s and % of copy bandwidth, speed-ups."""
    folder = tmp_path / "kernels-nvidia-h200"
    folder.mkdir()
    timings = [{"shape": "swin_b_192", "op": "masked_l1", "impl": impl, "ms": ms, "floor_bytes": 4e8,
                "gb_s": 4e8 / ms / 1e6}
               for impl, ms in (("fused", 0.2), ("eager ref", 1.0), ("compiled ref", 0.4))]
    (folder / "kernels.json").write_text(json.dumps({
        "device": "NVIDIA H200", "batch": 128, "copy_gb_s": 4000.0, "timings": timings,
        "checks": [{"shape": "swin_b_192", "op": "masked_l1", "max_abs_err": 1e-3, "ok": True}]}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("bench kernels\tOK\t12\t\nbench claims\tSKIPPED\t0\tneeds time\n")
    text = gpu_summary.summary(tmp_path, steps, "t")
    assert " 1  bench kernels " in text and " 2  bench claims " in text and "SKIPPED" in text
    assert "2000 (50%)" in text and "400 (10%)" in text and "5.00x" in text and "2.00x" in text


def test_summary_reads_memory_figures(tmp_path):
    """The memory block: one row per encoder, GB per GPU for each configuration, as memory.json holds them."""
    folder = tmp_path / "memory-nvidia-h200"
    folder.mkdir()
    totals = {"DDP": 95.3, "FSDP2 x8": 41.0, "DDP + AC": 60.0, "FSDP2 x8 + AC": 12.5}
    (folder / "memory.json").write_text(json.dumps({
        "device": "NVIDIA H200", "gpus": 8, "precision": "bf16",
        "results": [{"arch": "swinv2_huge", "params": 658e6, "batch_per_gpu": 64, "total_gb": totals}]}))
    text = gpu_summary.summary(tmp_path, tmp_path / "steps.tsv", "t")
    assert "FSDP2 over 8 GPUs" in text and "NVIDIA H200" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("swinv2_huge"))
    assert row.split()[1:] == ["658M", "64", "95.3", "41.0", "60.0", "12.5"]
