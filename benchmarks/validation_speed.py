"""SBC + expected coverage + TARP: sbipipe's batched implementation against sbi's diagnostics,
on the same trained posterior and the same test set (1,000 simulations × 1,000 draws, two_moons).

sbi gets the posterior through a thin adapter (``sample_batched`` and ``log_prob``), so both sides
pay for the same network evaluations; the difference is how the statistics are computed. sbi's
expected coverage is ``run_sbc(reduce_fns=-log_prob)`` (one log_prob call per test simulation),
its SBC check is ``check_sbc`` (KS tests plus two C2STs), and TARP is ``run_tarp`` + ``check_tarp``.

    python benchmarks/validation_speed.py [--workdir /tmp/valbench] [--sims 1000] [--samples 1000] [--ours-only]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from sbipipe.bank import SimulationBank, simulate_bank
from sbipipe.npe import train_posterior
from sbipipe.posterior import load_posterior
from sbipipe.validation import calibration_checks


class ForSbi:
    """Our posterior with the two methods sbi's diagnostics call."""

    def __init__(self, posterior):
        self.posterior = posterior

    def sample_batched(self, sample_shape, x, show_progress_bars=False, **_):
        return self.posterior.sample(x, int(sample_shape[0]), seed=0).transpose(0, 1)  # [L, N, D]

    def log_prob(self, theta, x, **_):
        return self.posterior.log_prob(theta, x).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/sbipipe-validation-bench")
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-only", action="store_true", help="skip sbi (its part takes ~20 min)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train_bank, test_bank, model = work / "train.h5", work / "test.h5", work / "npe"
    simulate_bank("two_moons", train_bank, 10_000, seed=1)
    simulate_bank("two_moons", test_bank, args.sims, seed=2)
    if not (model / "card.json").exists():
        train_posterior(train_bank, model, seed=0)
    post = load_posterior(model)
    theta, x = SimulationBank(test_bank).read(0, args.sims)
    L = args.samples

    t0, c0 = time.perf_counter(), time.process_time()
    ours = calibration_checks(post, theta, x, n_samples=L, seed=0)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    print(f"sbipipe calibration_checks: {t_ours:.1f} s wall, {c_ours:.1f} CPU-s (all threads; a busy "
          f"machine inflates the wall time, not the CPU time); load average {os.getloadavg()[0]:.1f}")
    if args.ours_only:
        return

    from sbi.diagnostics import check_sbc, check_tarp, run_sbc, run_tarp

    adapter = ForSbi(post)
    times = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ranks, dap = run_sbc(theta, x, adapter, num_posterior_samples=L, show_progress_bar=False)
        times["run_sbc"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sbc = check_sbc(ranks, theta, dap, num_posterior_samples=L)  # the test θ are prior draws
        times["check_sbc"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cov_ranks, _ = run_sbc(theta, x, adapter, num_posterior_samples=L, show_progress_bar=False,
                               reduce_fns=lambda th, xo: -adapter.log_prob(th, xo))
        times["coverage (run_sbc, -log_prob)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ecp, alpha = run_tarp(theta, x, adapter, num_posterior_samples=L, show_progress_bar=False)
        atc, ks = check_tarp(ecp, alpha)
        times["run_tarp + check_tarp"] = time.perf_counter() - t0
    t_sbi = sum(times.values())

    print(f"two_moons, {args.sims} test simulations x {L} posterior draws, {args.threads} threads")
    print(f"{'step':36s} {'seconds':>8s}")
    for k, v in times.items():
        print(f"{'sbi ' + k:36s} {v:8.2f}")
    print(f"{'sbi total':36s} {t_sbi:8.2f}")
    print(f"{'sbipipe calibration_checks (all)':36s} {t_ours:8.2f}")
    print(f"speed-up sbi/sbipipe: {t_sbi / t_ours:.1f}x   (target: sbipipe < 60 s)")
    p = ours["sbc_pvalues"]
    print(f"SBC p-values: sbipipe chi2 {[round(v, 3) for v in p]}, sbi KS {[round(float(v), 3) for v in sbc['ks_pvals']]}")
    cov_sbi = float((cov_ranks[:, 0] / L).sort().values.sub(torch.linspace(0, 1, len(cov_ranks))).abs().max())
    rows = {r["metric"]: r["value"] for r in ours["rows"] if r["parameter"] == "all"}
    print(f"coverage deviation: sbipipe {rows['coverage']:.3f}, sbi ranks {cov_sbi:.3f}; "
          f"TARP ATC: sbipipe {rows['tarp_atc']:+.3f}, sbi {atc:+.3f}")
    print(f"verdict: {'calibrated' if not ours['failing'] else ours['failing']}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
