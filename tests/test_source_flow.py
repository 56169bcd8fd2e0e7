"""The ``source-posterior`` flow against the real local Prefect server: a tiny source prior, one
lensed image; the flow's file equals the library's (the CLI's) bit for bit, its task carries the
``gpu`` tag, and the summary and the plot are published as artifacts."""

from __future__ import annotations

import json

import h5py
import numpy as np
import torch

from sbipipe.source_posterior import reconstruct_source, train_source_prior
from simulators.lensing import LensSIEShear

from .service_helpers import finished_run, service  # noqa: F401  (service: session fixture)


def test_source_posterior_flow_writes_the_cli_file_and_publishes_artifacts(service, tmp_path):
    from flows.source_posterior import source_posterior

    prior = tmp_path / "prior"
    train_source_prior(prior, images=40, epochs=1, batch_size=20, channels=(4, 8), pixels=16, pixel_scale=0.16,
                       device="cpu")
    sim = LensSIEShear()  # an observation and its truth file, as `sbipipe observe` writes them
    gen = torch.Generator().manual_seed(3)
    theta = sim.sample_prior(1, gen)
    obs = tmp_path / "obs.npy"
    np.save(obs, sim.simulate(theta, gen)[0].numpy())
    lens = tmp_path / "obs.truth.json"
    lens.write_text(json.dumps({"parameter_names": list(sim.parameter_names), "theta": theta[0].tolist()}))
    out = tmp_path / "post.h5"
    kw = {"n": 3, "steps": 4, "corrector_steps": 1, "seed": 2}
    with service.settings():
        state = source_posterior(str(prior), str(lens), str(obs), str(out), device="auto", return_state=True, **kw)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["output"] == str(out) and result["plot"] == str(tmp_path / "post.png")
    assert (tmp_path / "post.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reference = reconstruct_source(prior, str(lens), obs, tmp_path / "ref.h5", device="cpu", **kw)
    assert result["chi2_mean"] == reference["chi2_mean"]
    with h5py.File(out) as f, h5py.File(tmp_path / "ref.h5") as g:
        assert f["samples"].shape == (3, 16, 16) and f["observation"].shape == (64, 64)
        assert f.attrs["kind"] == "source_posterior" and f.attrs["steps"] == 4
        assert f.attrs["lens_theta_E"] == float(theta[0, list(sim.parameter_names).index("theta_E")])
        assert set(f) == set(g) and set(f.attrs) == set(g.attrs)
        for name in f:  # same seed on CPU: the same bits as `sbipipe source-posterior`
            np.testing.assert_array_equal(f[name][()], g[name][()])
        for key in f.attrs:
            assert str(f.attrs[key]) == str(g.attrs[key]), key

    run, runs, by_type = finished_run(service, state.state_details.flow_run_id, "the sampling task run")
    assert run.name == f"source posterior of {tmp_path.name}/obs.npy"
    assert [(r.name, "gpu" in r.tags) for r in runs] == [(run.name, True)]
    assert set(by_type) == {"markdown", "image"}
    markdown = by_type["markdown"]["data"]
    mean_chi2 = f"chi2/pixel of the posterior mean | **{result['chi2_mean']:.3f}**"
    for fragment in ("# Source posterior: obs.npy", "| lens | theta_E=", mean_chi2, f"| samples | 3: `{out}` |",
                     "data:image/png;base64,"):
        assert fragment in markdown, fragment
    assert by_type["image"]["data"].startswith("data:image/png;base64,")
