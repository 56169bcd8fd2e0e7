"""sbipipe's NSF and MAF (``sbipipe/autoregressive.py``) against zuko's own, with the same weights and
inputs: CPU time of a training step (512 rows, AdamW) and of drawing 10⁴ samples for one context.

The flows are the engine's defaults (5 transforms, two hidden layers of 64, coupling passes; the NSF
with ReLU units, the MAF with tanh units: torch's ``nn.Tanh`` in zuko's, ``sbipipe.activations.Tanh``
in ours), at the sizes of the benchmark tasks (parameters D, observation features C). Rounds interleave the two
implementations, so a busy machine slows both alike; the best and the median round are printed.

    python benchmarks/flow_speed.py [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import zuko

from sbipipe.activations import Tanh
from sbipipe.autoregressive import MAF, NSF

SIZES = {"two_moons": (2, 2), "slcp": (5, 8), "gaussian_linear": (10, 10)}
FLOWS = {"nsf": (zuko.flows.NSF, NSF), "maf": (zuko.flows.MAF, MAF)}
#: the hidden units of each flow (zuko's, ours), as the engine's estimator defaults
ACTIVATIONS = {"nsf": (torch.nn.ReLU, torch.nn.ReLU), "maf": (torch.nn.Tanh, Tanh)}


def step_timer(flow: torch.nn.Module, theta: torch.Tensor, x: torch.Tensor, steps: int = 50) -> Callable[[], float]:
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-6, fused=True)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = -flow(x).log_prob(theta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps * 1e3

    return run


def sample_timer(flow: torch.nn.Module, context: torch.Tensor, n: int = 10_000) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            flow(context).sample((n,))
            return (time.perf_counter() - t0) * 1e3

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| flow | size (D, C) | step ms zuko | ours | ratio | 10⁴ draws ms zuko | ours | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (theirs_cls, ours_cls) in FLOWS.items():
        for task, (d, c) in SIZES.items():
            kw = {"transforms": 5, "hidden_features": (64, 64), "passes": 2}
            torch.manual_seed(0)  # the same weights in every run
            theirs_act, ours_act = ACTIVATIONS[name]
            ours = ours_cls(d, c, activation=ours_act, **kw)
            theirs = theirs_cls(d, c, activation=theirs_act, **kw)
            theirs.load_state_dict(ours.state_dict())
            g = torch.Generator().manual_seed(0)
            theta, x = torch.randn(512, d, generator=g), torch.randn(512, c, generator=g)
            timers = {
                "step_theirs": step_timer(theirs, theta, x), "step_ours": step_timer(ours, theta, x),
                "draw_theirs": sample_timer(theirs, x[:1]), "draw_ours": sample_timer(ours, x[:1]),
            }
            for t in timers.values():
                t()  # warm-up
            times: dict[str, list[float]] = {k: [] for k in timers}
            for _ in range(args.rounds):
                for k, t in timers.items():
                    times[k].append(t())
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {task} ({d}, {c}) | {best['step_theirs']:.1f} | {best['step_ours']:.1f} | "
                  f"{best['step_ours'] / best['step_theirs']:.2f} (median {med['step_ours'] / med['step_theirs']:.2f}) | "
                  f"{best['draw_theirs']:.1f} | {best['draw_ours']:.1f} | "
                  f"{best['draw_ours'] / best['draw_theirs']:.2f} (median {med['draw_ours'] / med['draw_theirs']:.2f}) |",
                  flush=True)


if __name__ == "__main__":
    main()
