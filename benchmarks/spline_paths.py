"""The NSF's spline as one compiled C loop (``sbipipe/spline_kernel.c``) against the same spline as
torch operations (the fallback without a compiler): a training step (AdamW, 512 and 64 rows) and
10⁴ draws for one context, at the benchmark tasks' sizes, the two paths alternating in one process.

    python benchmarks/spline_paths.py [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import sbipipe.spline
from flow_speed import SIZES, sample_timer, step_timer
from sbipipe.autoregressive import NSF
from sbipipe.native import spline_library


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if spline_library(torch.float32) is None:
        raise SystemExit("spline_paths: the compiled spline is not available (no C compiler, or SBIPIPE_NATIVE=0)")
    paths = {"torch": lambda dtype: None, "compiled": spline_library}
    print("| size (D, C) | rows | step ms torch | compiled | ratio | 10⁴ draws ms torch | compiled | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task, (d, c) in SIZES.items():
        for rows in (512, 64):
            torch.manual_seed(0)
            flow = NSF(d, c, transforms=5, hidden_features=(64, 64), passes=2)
            step = step_timer(flow, torch.randn(rows, d), torch.randn(rows, c), steps=20)
            draw = sample_timer(flow, torch.randn(c))
            steps, draws = {k: [] for k in paths}, {k: [] for k in paths}
            for _ in range(args.rounds):
                for name, library in paths.items():
                    sbipipe.spline.spline_library = library
                    steps[name].append(step())
                    if rows == 512:
                        draws[name].append(draw())
            cells = [f"{task} ({d}, {c})", str(rows)]
            for times in (steps, draws):
                if not times["torch"]:
                    cells += ["", "", ""]
                    continue
                t, n = (min(times[k]) for k in ("torch", "compiled"))
                ratio = statistics.median(times["compiled"]) / statistics.median(times["torch"])
                cells += [f"{t:.1f}", f"{n:.1f}", f"{n / t:.2f} (median {ratio:.2f})"]
            print("| " + " | ".join(cells) + " |", flush=True)
    sbipipe.spline.spline_library = spline_library


if __name__ == "__main__":
    main()
