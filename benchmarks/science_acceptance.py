"""Science acceptance of the validation issue: for each science simulator, a model trained with the
defaults passes the gate, and its C2ST against exact (emcee) reference posteriors of ≥ 5
observations is within the target.

Per simulator: a training bank of ``--sims`` simulations (seed 1), a test bank of 1,000 (seed 2),
``sbipipe train`` defaults, ``--observations`` synthetic observations (seeds 100, 101, …) with an
exact reference posterior each (``sbipipe reference``: emcee on the simulator's log-likelihood),
then ``validate_model`` with those references and observations. Everything is cached in
``--workdir``, so an interrupted run continues where it stopped.

    python benchmarks/science_acceptance.py [--simulators cosmo_gaussian,cosmo_lognormal,dwarf,lens_sie]
        [--sims 100000] [--observations 5] [--workdir /tmp/sbipipe-science]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from sbipipe.bank import simulate_bank
from sbipipe.npe import train_posterior
from sbipipe.observations import save_observation
from sbipipe.reference import reference_posterior
from sbipipe.registry import get_simulator
from sbipipe.samples import write_samples
from sbipipe.validation import validate_model

TARGETS = {"cosmo_gaussian": 0.60, "cosmo_lognormal": 0.60, "dwarf": 0.65, "lens_sie": 0.65}


def run(name: str, sims: int, n_obs: int, work: Path, ref_samples: int) -> dict:
    sim = get_simulator(name)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.perf_counter()
    simulate_bank(name, d / "train.h5", sims, seed=1)
    simulate_bank(name, d / "test.h5", 1000, seed=2)
    t["simulate_s"] = time.perf_counter() - t0
    model = d / "model"
    t0 = time.perf_counter()
    if not (model / "card.json").exists():
        train_posterior(d / "train.h5", model, seed=0, resume=(model / "checkpoints").exists())
    t["train_s"] = time.perf_counter() - t0
    refs, obs = [], []
    t0 = time.perf_counter()
    for k in range(n_obs):
        o, r = d / f"obs{k}.npy", d / f"ref{k}.h5"
        if not r.exists():
            gen = torch.Generator().manual_seed(100 + k)
            theta = sim.sample_prior(1, gen)
            x = sim.simulate(theta, gen)
            save_observation(o, x[0], {"simulator": name, "theta": theta[0].tolist(), "seed": 100 + k})
            ref = reference_posterior(sim, x, n=ref_samples, seed=k)
            write_samples(r, ref.samples, list(sim.parameter_names),
                          {"simulator": name, "kind": "reference", "tau_max": ref.diagnostics["tau_max"]},
                          datasets={"observation": x[0]})
        refs.append(r)
        obs.append(o)
    t["reference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = validate_model(model, d / "test.h5", d / "report", references=refs, observations=obs[:1])
    t["validate_s"] = time.perf_counter() - t0
    metrics = pd.read_csv(d / "report" / "metrics.csv", keep_default_na=False)
    c2st = metrics.loc[metrics["metric"] == "c2st", "value"].astype(float)
    cov = float(metrics.loc[metrics["metric"] == "coverage", "value"].iloc[0])
    return {"simulator": name, "train_sims": sims, "calibrated": summary["calibrated"],
            "c2st_mean": round(float(c2st.mean()), 3), "c2st_max": round(float(c2st.max()), 3),
            "target": TARGETS.get(name), "coverage_dev": round(cov, 3),
            "min_contraction": round(min(summary["contraction"].values()), 3),
            "failing": "; ".join(summary["failing"]), **{k: round(v, 1) for k, v in t.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulators", default=",".join(TARGETS))
    ap.add_argument("--sims", type=int, default=100_000)
    ap.add_argument("--observations", type=int, default=5)
    ap.add_argument("--reference-samples", type=int, default=10_000)
    ap.add_argument("--workdir", default="/tmp/sbipipe-science")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for name in args.simulators.split(","):
        row = run(name, args.sims, args.observations, work, args.reference_samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    (work / "science_acceptance.csv").write_text(table.to_csv(index=False))
    print(table.to_markdown(index=False) if hasattr(table, "to_markdown") else table.to_string(index=False))


if __name__ == "__main__":
    main()
