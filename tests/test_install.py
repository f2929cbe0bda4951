"""Loading the compiled ops, the reference fallbacks, Triton availability, and ``python -m calexnet_fast.info``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import calexnet_fast
from calexnet_fast.availability import cascade_plan
from calexnet_fast.kernels import triton_status
from calexnet_fast.ops import library_status


def _python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_native_library_loaded():
    status = library_status()
    assert status.cpu_path is not None, f"the C++ CPU library did not load: {status.cpu_error}"
    assert "cpu" not in status.fallbacks


def test_fallback_without_library_warns_and_agrees(tmp_path, package_env):
    code = textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import calexnet_fast
        msgs = [str(w.message) for w in caught if "calexnet_fast" in str(w.message)]
        assert len(msgs) == 1 and "reference" in msgs[0], msgs
        from calexnet_fast.ops import library_status
        x = torch.randn(5, 2)
        mask = torch.tensor([True, False, True, True, False])
        rows, index = torch.ops.calexnet_fast.compact(x, mask)
        assert torch.equal(rows, x[mask]) and index.tolist() == [0, 2, 3]
        assert "cpu" in library_status().fallbacks
        print("ok")
        """
    )
    res = _python(code, dict(package_env, CALEXNET_NO_EXTENSION="1"), tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_source_tree_without_libraries_imports_with_one_warning(tmp_path):
    """A source checkout imported from its root (no compiled ops there) says so in one warning and works."""
    pkg = Path(calexnet_fast.__file__).resolve().parent
    shutil.copytree(pkg, tmp_path / "calexnet_fast", ignore=shutil.ignore_patterns("_lib", "__pycache__"))
    (tmp_path / "CMakeLists.txt").write_text("# marks the source tree\n")
    code = textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import calexnet_fast
            from calexnet_fast import Cascade, kernels
        assert calexnet_fast.__file__.startswith(ROOT), calexnet_fast.__file__
        msgs = [str(w.message) for w in caught if "calexnet_fast" in str(w.message)]
        assert len(msgs) == 1 and "source tree" in msgs[0] and "reference" in msgs[0], msgs
        rows, index = calexnet_fast.ops.compact(torch.arange(3.0), torch.tensor([True, False, True]))
        assert rows.tolist() == [0.0, 2.0] and index.tolist() == [0, 2]
        print("ok")
        """
    ).replace("ROOT", repr(str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = _python(code, env, tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_package_does_not_install_top_level_kernels():
    assert calexnet_fast.__file__ is not None
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "calexnet_fast" not in str(spec.origin or "")


def test_triton_status_here():
    usable, how = triton_status()
    assert isinstance(usable, bool) and how
    if torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert usable and "interpreter" in how
    else:
        assert not usable and "reference" in how


def test_import_and_cpu_ops_without_triton(package_env):
    """With triton unimportable, calexnet_fast.kernels imports, says why, and the CPU ops still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from calexnet_fast.kernels import triton_status, exit_decision\n"
        "ok, how = triton_status(); assert not ok and 'not installed' in how, how\n"
        "ex, pred, conf = exit_decision(torch.tensor([[0.0, 5.0]]), torch.tensor([0.5, 0.5]))\n"
        "assert ex.tolist() == [True] and pred.tolist() == [1]\n"
        "print('OK', how)\n"
    )
    env = dict(package_env)
    env.pop("TRITON_INTERPRET", None)
    proc = _python(code, env, Path("/"))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_cascade_plan_follows_the_load_status():
    cpu = cascade_plan("cpu")
    assert cpu.heads == cpu.compaction == ("c++" if library_status().cpu_path else "reference")
    assert cascade_plan("cuda").compaction == ("c++" if library_status().cuda_path else "reference")


def test_info_report_runs_outside_the_tree(package_env):
    proc = subprocess.run(
        [sys.executable, "-m", "calexnet_fast.info"],
        capture_output=True,
        text=True,
        env=package_env,
        timeout=300,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for what in ("calexnet_fast ", "op libraries", "CPU : loaded from", "Triton kernels:", "Cascade backend:"):
        assert what in out, out
