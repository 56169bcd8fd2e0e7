"""Which set embedding lets the NPE learn the dwarf-galaxy posterior: validation loss (held-out
−log q(θ | x), lower is better; differences are expected-KL differences) of the same NSF trained
with the plain ``deepset`` on standardised (R, v) and with ``kinematics`` (DeepSet over
(ln R, ln R/R_h, v, v²) plus binned dispersion and kurtosis profiles in R/R_h), same bank, seed
and budget.

    python benchmarks/dwarf_embeddings.py [--sims 20000] [--epochs 15] [--workdir /tmp/sbipipe-dwarf-emb]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sbipipe.bank import simulate_bank
from sbipipe.npe import train_posterior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--embeddings", default="deepset,kinematics")
    ap.add_argument("--workdir", default="/tmp/sbipipe-dwarf-emb")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bank = simulate_bank("dwarf", work / f"dwarf_{args.sims}.h5", args.sims, seed=1).path
    print(f"dwarf, {args.sims:,} simulations, NSF, {args.epochs} epochs, seed 0")
    print(f"{'embedding':<12} {'best val loss':>14} {'train loss':>11} {'seconds':>8}")
    for emb in args.embeddings.split(","):
        t0 = time.perf_counter()
        post = train_posterior(bank, work / f"model_{emb}", estimator="nsf", embedding=emb,
                               max_epochs=args.epochs, seed=0)
        final = post.card["training"]["final"][0]
        print(f"{emb:<12} {final['best_val_loss']:>14.3f} {final['final_train_loss']:>11.3f} "
              f"{time.perf_counter() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
