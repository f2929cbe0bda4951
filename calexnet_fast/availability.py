"""What can run here, detected once: the C++ op libraries, Triton, and the backend ``Cascade`` picks.

``python -m calexnet_fast.info`` prints it; ``calexnet_fast.Cascade`` makes its choice from it, so the
report and the behaviour cannot disagree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .kernels import triton_status
from .ops import library_status


@dataclass(frozen=True)
class Plan:
    """How the cascade runs on one device type, and why."""

    device: str
    compaction: str  # "c++" or "reference"
    heads: str  # "triton", "c++" (CPU: the grid head's C++ exit path) or "reference"
    reasons: tuple[str, ...]

    def describe(self) -> str:
        what = f"{self.device}: heads={self.heads}, compaction={self.compaction}"
        return what + "".join(f"\n    - {r}" for r in self.reasons)


@functools.cache
def cascade_plan(device_type: str) -> Plan:
    """The backend ``Cascade`` uses for tensors on ``device_type`` ("cpu" or "cuda")."""
    status = library_status()
    reasons: list[str] = []
    if device_type == "cuda":
        compaction = "c++" if status.cuda_path else "reference"
        if status.cuda_path is None:
            reasons.append(f"CUDA op library unavailable: {status.cuda_error}")
        usable, how = triton_status()
        heads = "triton" if usable and torch.cuda.is_available() else "reference"
        reasons.append(f"Triton: {how}")
    elif device_type == "cpu":
        compaction = "c++" if status.cpu_path else "reference"
        if status.cpu_path is None:
            reasons.append(f"CPU op library unavailable: {status.cpu_error}")
        heads = "c++" if status.cpu_path else "reference"
        reasons.append(
            "heads run in eager PyTorch on CPU (Triton compiles only for GPUs; its interpreter is for tests)"
            + (
                "; grid heads in float32/float64 run as the C++ op grid_plan_exit (the whole head and the exit "
                "decision in one pass per sample)"
                if status.cpu_path
                else ""
            )
        )
    else:
        raise ValueError(f"device_type: expected 'cpu' or 'cuda', got {device_type!r}")
    return Plan(device_type, compaction, heads, tuple(reasons))
