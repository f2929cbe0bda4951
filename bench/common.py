"""What the benchmarks share besides the timing harness (``calexnet_fast.evaluation.timing``): their JSON."""

from __future__ import annotations

from calexnet_fast import io


def write_json(path: str | None, payload: dict) -> None:
    """Write a benchmark's results to ``path`` (nothing when ``path`` is None) and say so."""
    if path:
        io.write_json(path, payload)
        print(f"wrote {path}")
