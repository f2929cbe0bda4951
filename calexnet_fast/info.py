"""``python -m calexnet_fast.info``: versions, loaded op libraries, Triton, and the Cascade backend."""

from __future__ import annotations

import platform

import torch

from ._version import __version__
from .availability import cascade_plan
from .kernels import triton_status
from .ops import library_status


def report() -> str:
    """The full availability report as text."""
    lines = [f"calexnet_fast {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    lines.append(
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
        f"CUDA available: {torch.cuda.is_available()})"
    )
    if torch.cuda.is_available():
        lines.append(
            f"  GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        )
    for mod in ("torchvision", "triton"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except ImportError as exc:
            lines.append(f"{mod}: not importable ({exc})")

    status = library_status()
    lines.append("op libraries (torch.ops.calexnet_fast.compact / scatter_rows_ / scatter_rows):")
    lines.append(
        f"  CPU : {'loaded from ' + status.cpu_path if status.cpu_path else 'NOT loaded: ' + str(status.cpu_error)}"
    )
    lines.append(
        f"  CUDA: {'loaded from ' + status.cuda_path if status.cuda_path else 'not loaded: ' + str(status.cuda_error)}"
    )
    if status.fallbacks:
        lines.append(f"  reference twins registered for: {', '.join(status.fallbacks)}")
    info = status.build_info
    if info:
        lines.append(
            f"  built against torch {info.get('torch_version')} (stable ABI target torch "
            f"{info.get('torch_target_version')}); CUDA library built: {info.get('cuda_built')}"
            + (
                f", archs {info.get('cuda_archs')}, nvcc {info.get('cuda_compiler_version')}"
                if info.get("cuda_built") == "ON"
                else ""
            )
        )
    usable, how = triton_status()
    lines.append(f"Triton kernels: {'usable' if usable else 'not usable'}: {how}")
    lines.append("Cascade backend:")
    for device in ("cpu", "cuda"):
        lines.append("  " + cascade_plan(device).describe().replace("\n", "\n  "))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
