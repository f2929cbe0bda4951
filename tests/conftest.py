"""Shared test fixtures and markers.

Markers (registered in pyproject.toml, [tool.pytest.ini_options]):
    needs_cuda: the test needs a CUDA device; skipped without one (failed instead under CALEXNET_REQUIRE_GPU=1,
        as bench/gpu_check.sh runs them; so are the ``kernel`` tests).
    kernel: the test launches a Triton kernel (takes the ``kernel_device`` fixture). It runs natively on CUDA
        when a GPU and a working Triton are present; without one, the file's ``test_interpreter_run`` re-runs
        the file's kernel tests in a subprocess under ``TRITON_INTERPRET=1`` on CPU tensors (the variable
        must be set before triton is imported, hence the subprocess), through ``run_kernel_tests_interpreted``.

Fixtures:
    device: parametrizes a test over "cpu" and "cuda" (the latter marked needs_cuda).
    package_env: environment for a child Python process that must import the very calexnet_fast this
        process imported (installed wheel or source tree).
    one_thread: torch.set_num_threads(1) for the test, restored after it.
    shared_data: the folder of real data and pretrained weights: $CALEXNET_DATA, else ../shared/data beside
        the clone (may be absent: tests that need it skip).
    random_tensor: factory ``random_tensor(shape, dtype, device, generator)``: normal floats, integers in [0, 100).
    make_head: factory of a trained-looking ``PrototypePoolingHead`` (non-trivial BN, eval mode).
    kernel_device / run_kernel_tests_interpreted: see the ``kernel`` marker.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Read once at import, before any test changes the environment.
SHARED_DATA = Path(os.environ.get("CALEXNET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Set in the child process that runs the kernel tests under Triton's interpreter.
INTERPRETER_WORKER = os.environ.get("CALEXNET_KERNELS_INTERP_WORKER") == "1"


def _fix_triton_interpreter_scalars() -> None:
    """Triton < 3.8's interpreter turns a scalar (a one-element array) into an int with ``int(array)``, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel whose
    loop bound is a runtime value then fails under TRITON_INTERPRET=1. Convert as triton 3.8 does."""
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8):
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if INTERPRETER_WORKER:
    _fix_triton_interpreter_scalars()

# The tests compare float32 fast paths with their references in IEEE float32, but torch runs float32
# convolutions through cuDNN in TF32 by default (a reference head's 1x1 conv is then ~2e-3 off in the logits):
# TF32 is off for the whole session. The legacy flags, which every torch >= 2.10 honours (mixing them with the
# newer fp32_precision settings is an error when read back).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that takes ``kernel_device`` launches a kernel, whether or not its author wrote the marker: the
    # interpreter runs and bench/gpu_check.sh select kernel tests by it.
    for item in items:
        if "kernel_device" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.kernel)


# bench/gpu_check.sh sets CALEXNET_REQUIRE_GPU=1: there, a CUDA or kernel test that cannot run fails instead of
# skipping, so that a GPU run never passes by testing nothing.
REQUIRE_GPU = os.environ.get("CALEXNET_REQUIRE_GPU") == "1"


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_GPU:
        pytest.fail(f"CALEXNET_REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_cuda") and not torch.cuda.is_available():
        _skip_or_fail("needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def device(request) -> str:
    """Each test using it runs on "cpu" and on "cuda" (skipped without a CUDA device)."""
    return request.param


@pytest.fixture
def package_env() -> dict[str, str]:
    """``os.environ`` with the directory holding the imported calexnet_fast first on PYTHONPATH."""
    import calexnet_fast

    env = dict(os.environ)
    root = str(Path(calexnet_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture
def shared_data() -> Path:
    """The real data folder (see the module docstring); check that what a test needs is there."""
    return SHARED_DATA


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def random_tensor():
    def make(shape, dtype: torch.dtype, device, generator: torch.Generator) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
        return torch.randint(0, 100, shape, generator=generator).to(dtype=dtype, device=device)

    return make


@pytest.fixture
def make_head():
    """``make_head(c, n_classes, dim=128, k=32, seed=0, cls=PrototypePoolingHead, **kwargs)``: a head of class
    ``cls`` (extra constructor arguments in ``kwargs``) in eval mode whose BN running statistics and affine
    parameters are far from identity (so folding is non-trivial), gamma = 7.5, and classifier weights scaled by
    4 (clear argmax margins). Deterministic in ``seed``."""
    from calexnet_fast.heads import PrototypePoolingHead

    def make(c: int, n_classes: int, dim: int = 128, k: int = 32, seed: int = 0, cls=PrototypePoolingHead, **kwargs):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = cls(c, n_classes, dim=dim, n_prototypes=k, **kwargs)
        with torch.no_grad():
            head.bn.weight.uniform_(0.5, 2.0, generator=g)
            head.bn.bias.uniform_(-0.5, 0.5, generator=g)
            head.gamma.fill_(7.5)
            head.classifier.weight.mul_(4.0)
            head.train()
            for _ in range(4):
                head(torch.randn(16, c, 6, 6, generator=g) * 3.0 + 1.5)
        return head.eval()

    return make


def _kernel_device() -> str | None:
    if INTERPRETER_WORKER:
        assert os.environ.get("TRITON_INTERPRET") == "1", "the interpreter worker needs TRITON_INTERPRET=1"
        return "cpu"
    from calexnet_fast.kernels import triton_status

    return "cuda" if torch.cuda.is_available() and triton_status()[0] else None


@pytest.fixture
def kernel_device() -> str:
    """Where a ``kernel`` test launches the Triton kernels: "cuda", or "cpu" in the interpreter worker."""
    dev = _kernel_device()
    if dev is None:
        _skip_or_fail("no usable GPU: the kernel tests run under TRITON_INTERPRET=1 in test_interpreter_run")
    return dev


@pytest.fixture
def run_kernel_tests_interpreted(package_env):
    """``run(test_file)``: run the file's ``kernel`` tests under ``TRITON_INTERPRET=1`` on CPU tensors in a
    fresh process; fails unless they all pass. Skips where triton is missing, and in the worker itself."""

    def run(test_file: str) -> None:
        if INTERPRETER_WORKER:
            pytest.skip("runs in the main test process")
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed: the kernels cannot be interpreted here")
        env = dict(package_env, TRITON_INTERPRET="1", CALEXNET_KERNELS_INTERP_WORKER="1")
        cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-m", "kernel", "-p", "no:cacheprovider"]
        cmd += ["-W", "ignore::RuntimeWarning"]  # numpy's inf - inf warnings inside the interpreter
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(test_file).parent)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"interpreter run failed (rc={proc.returncode}):\n{out[-8000:]}"
        summary = out.strip().splitlines()[-1]
        assert " passed" in summary and "skipped" not in summary, out[-3000:]

    return run
