"""What the op and kernel benchmarks (compact, scatter_rows, exit_decision, proto_head) share besides the
timing harness: a per-kernel timer and the measured copy bandwidth, their roofline."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calexnet_fast.evaluation.timing import median_time


class KernelTimer:
    """Median seconds per call of ``fn``: ``triton.testing.do_bench`` on CUDA (L2 flushed between runs), the
    harness's ``median_time`` over ``repeats`` calls elsewhere."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        return median_time(fn, self.device, repeats=self.repeats, warmup=1)


def copy_bandwidth(device: torch.device, timer: KernelTimer) -> float:
    """GB/s of a plain large copy (read + write; 1 GiB on CUDA, 128 MiB elsewhere): the measured bandwidth."""
    n = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timer(lambda: dst.copy_(src)) / 1e9


def speedup_row(case: dict, times: dict[str, float], op: str, moved_bytes: int, peak: float | None) -> dict:
    """One result row: ``case`` (what was timed), the median ms of every candidate, each torch candidate's
    time over ``op``'s (> 1: ``op`` is faster), ``op``'s GB/s for ``moved_bytes`` and its share of ``peak``."""
    row = {
        **case,
        "ms": {name: t * 1e3 for name, t in times.items()},
        "speedup": {name: t / times[op] for name, t in times.items() if name != op},
        "GBps": moved_bytes / times[op] / 1e9,
    }
    if peak:
        row["fraction_of_copy_bandwidth"] = row["GBps"] / peak
    return row


def print_speedups(rows: list[dict], op: str, peak: float | None) -> None:
    """The rows of ``speedup_row`` as a table, then the slowest ratio torch/``op`` over all of them."""
    case_keys = [k for k in rows[0] if k not in ("ms", "speedup", "GBps", "fraction_of_copy_bandwidth")]
    names, others = list(rows[0]["ms"]), list(rows[0]["speedup"])
    header = "".join(f"{k:>20}" if k == "shape" else f"{k:>9}" for k in case_keys)
    header += "".join(f"{n + ' ms':>16}" for n in names) + "".join(f"{'vs ' + n:>16}" for n in others)
    print(header + f"{'GB/s':>9}" + ("  of copy BW" if peak else ""))
    for r in rows:
        line = "".join(f"{str(r[k]):>20}" if k == "shape" else f"{r[k]:>9}" for k in case_keys)
        line += "".join(f"{r['ms'][n]:>16.3f}" for n in names)
        line += "".join(f"{r['speedup'][n]:>15.2f}x" for n in others) + f"{r['GBps']:>9.1f}"
        if peak:
            line += f"  {100 * r['fraction_of_copy_bandwidth']:>9.1f} %"
        print(line)
    worst = min(min(r["speedup"].values()) for r in rows)
    print(
        f"slowest ratio torch/{op} over all cases: {worst:.2f}x"
        + (f"; device copy bandwidth {peak:.0f} GB/s" if peak else "")
    )
