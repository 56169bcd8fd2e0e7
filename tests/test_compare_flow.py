"""The ``compare`` flow against the real local Prefect server: a small two-model classifier, a stack
of observations (one misspecified); the flow's CSV equals ``sbipipe compare run``'s, its task carries
the ``gpu`` tag, and the summary, the probabilities table and the calibration plot are published."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from sbipipe.comparison import train_comparison

from .service_helpers import finished_run, service  # noqa: F401  (service: session fixture)
from .test_comparison import FAST, box_pair, cli


def test_compare_flow_writes_the_cli_table_and_publishes_artifacts(service, tmp_path, capsys):
    from flows.compare import compare

    clf = tmp_path / "clf"
    train_comparison(list(box_pair()), clf, n=2000, loss="ce", seed=0, calibration_rows=500, device="cpu", **FAST)
    a, b = box_pair()
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([a.simulate(a.sample_prior(2, gen), gen), b.simulate(b.sample_prior(2, gen), gen),
                   torch.tensor([[40.0, -40.0]])])  # far outside both boxes: flagged
    # (500 held-out simulations per model: the smallest p-value is 2/1001, so flag at 1 %, not 0.1 %)
    obs = tmp_path / "obs.npy"
    np.save(obs, x.numpy())
    out = tmp_path / "probs.csv"
    with service.settings():
        state = compare(str(clf), str(obs), str(out), misspecification_level=0.01, device="auto", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["models"] == ["box_wide", "box_shifted"] and result["observations"] == 5
    assert result["flagged"] == 1 and result["calibration_plot"] == str(clf / "calibration.png")
    table = pd.read_csv(out)
    assert list(table.columns) == ["observation", "box_wide", "box_shifted", "log_bayes_factor", "most_probable",
                                   "misspecification_pvalue", "misspecified"]
    assert table["misspecified"].tolist() == [False] * 4 + [True]
    good = table.iloc[:4]
    np.testing.assert_allclose(good["box_wide"] + good["box_shifted"], 1.0, atol=1e-12)
    np.testing.assert_allclose(good["log_bayes_factor"], np.log(good["box_shifted"] / good["box_wide"]), atol=1e-9)
    assert table.iloc[4][["box_wide", "box_shifted", "log_bayes_factor"]].isna().all()
    # the same library call as `sbipipe compare run`: the same bytes
    code, _, err = cli(capsys, "compare", "run", clf, "--observation", obs, "-o", tmp_path / "cli.csv",
                       "--misspecification-level", "0.01")
    assert code == 0 and "1 of 5 observation(s) are unlike" in err, err
    assert (tmp_path / "cli.csv").read_bytes() == out.read_bytes()

    run, runs, by_type = finished_run(service, state.state_details.flow_run_id, "the classification task run")
    assert run.name == f"compare clf: {tmp_path.name}/obs.npy"
    assert [(r.name, "gpu" in r.tags) for r in runs] == [(run.name, True)]
    assert set(by_type) == {"markdown", "table", "image"}
    markdown = by_type["markdown"]["data"]
    for fragment in ("# Model comparison: obs.npy", "| models | box_wide, box_shifted |",
                     "| flagged as misspecified (p < 0.01) | **1** |", "ECE ", "| observation | box_wide |",
                     "data:image/png;base64,"):
        assert fragment in markdown, fragment
    rows = json.loads(by_type["table"]["data"])
    assert [r["observation"] for r in rows] == list(range(5))
    assert rows[4]["misspecified"] is True and rows[4]["box_wide"] is None
    assert rows[0]["log_bayes_factor"] == float(table["log_bayes_factor"][0])
    assert by_type["image"]["data"].startswith("data:image/png;base64,")
