"""Time a CPM calibration sweep (docs/design.md §1): M margins over N validation samples, K branches, on CPU.

    python bench/calibration.py [--n 10000] [--classes 10] [--branches 3] [--margins 50] [--repeat 5]

Prints the median wall time of ``calibrate`` (aligned and unaligned) per sweep.
"""

from __future__ import annotations

import argparse

import torch

from calexnet_fast.calibration import calibrate
from calexnet_fast.evaluation.timing import median_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="validation samples")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--margins", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, a.classes, (a.n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, a.classes).float()
    bb = torch.randn(a.n, a.classes, generator=g) * 2 + 3 * onehot
    branches = [torch.randn(a.n, a.classes, generator=g) * 2 + (1 + k) * onehot for k in range(a.branches)]
    margins = torch.linspace(0, 0.5, a.margins)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for aligned in (True, False):
        t = median_time(
            lambda aligned=aligned: calibrate(branches, bb, y, margins, aligned=aligned),
            torch.device("cpu"),
            a.repeat,
            warmup=1,
        )
        print(
            f"aligned={aligned!s:5}: {a.margins} margins x {a.branches} branches x {a.n} samples x "
            f"{a.classes} classes: median {t * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
