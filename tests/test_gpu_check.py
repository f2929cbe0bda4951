"""bench/gpu_check.sh, the one-call GPU check, exercised on CPU in its dry-run mode (GPU_CHECK_DRY_RUN=1): every
step runs a stand-in that checks what the real step needs (test selection collected, bench scripts and their
flags, the installed package's info), through the script's own timeouts, logs, packing and summary. Also the
test harness's fix for the GPU machine's Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
STEPS = [
    "env",
    "build",
    "info",
    "selfcheck",
    "cuda_tests",
    "bench_compact",
    "bench_scatter_rows",
    "bench_exit_decision",
    "bench_proto_head",
    "bench_grid_head",
    "bench_throughput",
]


def _dry_run(tmp_path: Path, package_env: dict[str, str], **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    run_env = dict(package_env, GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **env)
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path)
    )
    return proc, out


def _summary(out: Path) -> dict[str, list[str]]:
    rows = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line.split() for line in rows[1:] if line.strip() and not line.startswith("(")}


def test_dry_run_passes_and_packs_everything(tmp_path, package_env):
    proc, out = _dry_run(tmp_path, package_env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.tar.gz", "summary.txt"]  # at most 8 files come back from the GPU machine
    summary = _summary(out)
    assert [s for s in summary if s != "total"] == STEPS
    assert all(summary[s][1] == "PASS" for s in summary), summary
    assert int(summary["total"][3].rstrip("s")) <= 450
    # the plan fits in 8 minutes: the estimates add up to less, and so does the total budget
    estimates = sum(int(summary[s][5].rstrip("s")) for s in STEPS)
    assert estimates <= 450, estimates
    assert " ".join(summary["cuda_tests"]).count("tests collected")
    # the summary table is what the script prints last
    assert proc.stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{s}.log" for s in STEPS} <= names
    assert {"junit/selfcheck.xml", "junit/cuda_tests.xml", "summary.txt"} <= names


def test_dry_run_reports_a_failed_build_and_skips_what_needs_it(tmp_path, package_env):
    proc, out = _dry_run(
        tmp_path, package_env, GPU_CHECK_ONLY="env build info bench_compact", GPU_CHECK_DRY_FAIL="build"
    )
    assert proc.returncode == 1
    summary = _summary(out)
    assert (summary["env"][1], summary["build"][1], summary["info"][1]) == ("PASS", "FAIL", "SKIP")
    assert summary["bench_compact"][1] == "SKIP" and summary["total"][1] == "FAIL"
    assert "injected failure" in proc.stdout  # the failed step's last log lines are printed
    assert "current_step.log" not in os.listdir(out)


def test_dry_run_times_out_a_hung_step_within_the_total_budget(tmp_path, package_env):
    proc, out = _dry_run(
        tmp_path, package_env, GPU_CHECK_ONLY="env info", GPU_CHECK_DRY_HANG="env", GPU_CHECK_TOTAL_S="14"
    )  # 14 s: the script's set-up may cross a second boundary and a step needs 10 s left to start
    assert proc.returncode == 1
    summary = _summary(out)
    assert summary["env"][1] == "TIMEOUT" and summary["info"][1] == "SKIP", summary
    assert int(summary["total"][3].rstrip("s")) < 30


def test_interpreter_scalar_fix_for_triton_before_3_8(monkeypatch):
    """tests/conftest.py's fix for the GPU machine's triton 3.6, whose interpreter turns a scalar into an int with
    ``int(one_element_array)`` (refused by numpy >= 2.4), simulated on this machine's triton."""
    pytest.importorskip("triton")
    import conftest
    import triton
    from triton.runtime import interpreter

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Scalar:  # what the interpreter's tensors hold for a scalar: a one-element array
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    def patch_like_triton_3_6(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_like_triton_3_6, raising=False)
    conftest._fix_triton_interpreter_scalars()
    interpreter._patch_lang_tensor(Scalar, Scope())
    assert list(range(Scalar(3))) == [0, 1, 2]
