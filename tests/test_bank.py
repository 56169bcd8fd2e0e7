"""Simulation banks: reproducibility, resumption after SIGKILL, extension, refusal, streaming."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from sbipipe import SbipipeError
from sbipipe.bank import SimulationBank, simulate_bank, validation_mask

from .conftest import SBIPIPE

SLOW_MODULE = textwrap.dedent(
    """
    import time
    import torch
    from simulators.benchmarks import TwoMoons

    class SlowMoons(TwoMoons):
        name = "slow_moons"
        def simulate(self, theta, generator=None):
            time.sleep(0.12)
            return super().simulate(theta, generator)

    class HolesMoons(TwoMoons):
        name = "holes_moons"
        def simulate(self, theta, generator=None):
            x = super().simulate(theta, generator)
            x[theta[:, 0] > 0.8] = float("nan")   # ~10% of draws fail
            return x
    """
)


@pytest.fixture
def sims(tmp_path, monkeypatch):
    (tmp_path / "testsims.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _data(path):
    with h5py.File(path, "r") as f:
        return f["theta"][:], f["x"][:]


def test_same_command_same_data_and_attributes(tmp_path):
    a = simulate_bank("two_moons", tmp_path / "a.h5", 25_000, seed=5, chunk_size=4000)
    b = simulate_bank("two_moons", tmp_path / "b.h5", 25_000, seed=5, chunk_size=4000)
    ta, xa = _data(a.path)
    tb, xb = _data(b.path)
    assert ta.shape == (25_000, 2) and xa.shape == (25_000, 2)
    assert np.array_equal(ta, tb) and np.array_equal(xa, xb)
    assert a.content_hash() == b.content_hash()
    c = simulate_bank("two_moons", tmp_path / "c.h5", 25_000, seed=6, chunk_size=4000)
    assert a.content_hash() != c.content_hash()
    attrs = a.attrs
    assert attrs["simulator"] == "two_moons" and attrs["simulator_version"] == "1"
    assert attrs["parameter_names"] == ["theta1", "theta2"] and attrs["seed"] == 5
    assert attrs["dropped"] == 0 and "Uniform" in attrs["prior"] and attrs["created"] and attrs["sbipipe_version"]


def test_extension_and_workers_equal_one_run(tmp_path):
    full = simulate_bank("slcp", tmp_path / "full.h5", 9_000, seed=1, chunk_size=1000)
    part = simulate_bank("slcp", tmp_path / "part.h5", 2_500, seed=1, chunk_size=1000)
    assert len(part) == 2_500
    part = simulate_bank("slcp", tmp_path / "part.h5", 9_000)  # extends with the stored seed/chunk size
    par = simulate_bank("slcp", tmp_path / "par.h5", 9_000, seed=1, chunk_size=1000, workers=2)
    for other in (part, par):
        assert np.array_equal(_data(full.path)[0], _data(other.path)[0])
        assert np.array_equal(_data(full.path)[1], _data(other.path)[1])
    assert len(simulate_bank("slcp", tmp_path / "full.h5", 100)) == 9_000  # smaller -n: nothing to do


def test_non_finite_simulations_are_dropped_and_counted(sims):
    bank = simulate_bank("testsims:HolesMoons", sims / "h.h5", 5_000, seed=0, chunk_size=1000)
    theta, x = _data(bank.path)
    assert len(theta) == 5_000 and np.isfinite(x).all() and (theta[:, 0] <= 0.8).all()
    assert 300 < bank.attrs["dropped"] < 800
    grown = simulate_bank("testsims:HolesMoons", sims / "g.h5", 2_000, seed=0, chunk_size=1000)
    grown = simulate_bank("testsims:HolesMoons", sims / "g.h5", 5_000)
    assert np.array_equal(_data(grown.path)[1], x) and grown.attrs["dropped"] == bank.attrs["dropped"]


def test_refusals(tmp_path):
    path = tmp_path / "bank.h5"
    simulate_bank("two_moons", path, 100, seed=0)
    before = _data(path)
    with pytest.raises(SbipipeError, match="holds two_moons v1; refusing to append slcp"):
        simulate_bank("slcp", path, 200)
    with pytest.raises(SbipipeError, match="made with --seed 0, not 3"):
        simulate_bank("two_moons", path, 200, seed=3)
    with pytest.raises(SbipipeError, match="positive"):
        simulate_bank("two_moons", path, 0)
    assert all(np.array_equal(a, b) for a, b in zip(before, _data(path)))  # untouched


def test_corrupt_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(SbipipeError, match="corrupt or not a bank"):
        SimulationBank(junk)
    with pytest.raises(SbipipeError, match="corrupt or not a bank"):
        simulate_bank("two_moons", junk, 10)
    assert junk.read_bytes() == b"not an hdf5 file at all"
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(SbipipeError, match="not an sbipipe simulation bank"):
        SimulationBank(foreign)
    with pytest.raises(SbipipeError, match="does not exist"):
        SimulationBank(tmp_path / "missing.h5")


def test_streamed_batches_cover_each_split_once(tmp_path):
    bank = simulate_bank("gaussian_linear", tmp_path / "g.h5", 20_000, seed=2, chunk_size=3000)
    theta_all, _ = bank.read()
    for split in ("train", "val"):
        seen = torch.cat([t for t, _ in bank.batches(512, split=split, seed=1, block_rows=1000, buffer_blocks=3)])
        expected = theta_all[bank.split_indices(split)]
        assert len(seen) == len(expected)
        order = lambda t: t[np.lexsort(t.numpy().T[::-1])]  # noqa: E731  (rows sorted lexicographically)
        assert torch.equal(order(seen), order(expected))
    n_val = len(bank.split_indices("val"))
    assert 1700 < n_val < 2300  # 10% validation
    first = torch.cat([t for t, _ in bank.batches(512, seed=1, block_rows=1000)])
    again = torch.cat([t for t, _ in bank.batches(512, seed=1, block_rows=1000)])
    other = torch.cat([t for t, _ in bank.batches(512, seed=2, block_rows=1000)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    theta_tr, _ = bank.load("train")
    assert torch.equal(theta_tr, theta_all[bank.split_indices("train")])
    # θ alone, without reading the observations (the streamed training's validation Jacobian)
    assert torch.equal(bank.parameters("train"), theta_tr) and torch.equal(bank.parameters(), theta_all)
    assert torch.equal(bank.parameters("val"), theta_all[bank.split_indices("val")])


def test_split_is_stable_when_a_bank_grows():
    rows = np.arange(50_000)
    assert np.array_equal(validation_mask(rows[:10_000], 0.1), validation_mask(rows, 0.1)[:10_000])
    assert abs(validation_mask(rows, 0.2).mean() - 0.2) < 0.01


def _kill_after_commits(cmd, path, commits, cwd):
    """Start ``cmd``, SIGKILL it once the bank has at least ``commits`` more committed writes."""
    start_rows = SimulationBank(path).rows if path.exists() else 0
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            rows = SimulationBank(path).rows if path.exists() else 0
        except SbipipeError:
            rows = 0
        if rows >= start_rows + commits:
            break
        time.sleep(0.05)
    time.sleep(0.37)  # land somewhere inside the next chunk or write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_sigkill_mid_write_then_resume_equals_uninterrupted_run(sims):
    env_cmd = [SBIPIPE, "simulate", "testsims:SlowMoons", "-n", "30000", "--seed", "11", "--chunk-size", "1000"]
    ref = sims / "ref.h5"
    simulate_bank("testsims:SlowMoons", ref, 30_000, seed=11, chunk_size=1000)
    bank = sims / "bank.h5"
    for _ in range(2):
        proc = _kill_after_commits([*env_cmd, "-o", str(bank)], bank, 1, sims)
        assert proc.returncode == -signal.SIGKILL
        partial = SimulationBank(bank)
        assert 0 < partial.rows < 30_000  # killed part-way
        t, x = partial.read()
        t_ref, x_ref = SimulationBank(ref).read(0, partial.rows)
        assert torch.equal(t, t_ref) and torch.equal(x, x_ref)  # what is visible is exactly the prefix
    done = subprocess.run([*env_cmd, "-o", str(bank)], cwd=sims, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(_data(bank)[0], _data(ref)[0]) and np.array_equal(_data(bank)[1], _data(ref)[1])
    assert not (sims / "bank.h5.lock").exists()


def test_writer_killed_between_commit_and_mirrors_resumes_exactly(tmp_path):
    """A writer killed after the one-call ``commit`` attribute but before the separate ``rows`` /
    ``next_chunk`` mirrors: readers and the resumed writer follow ``commit``, so the chunk is
    neither appended twice nor lost."""
    whole = simulate_bank("two_moons", tmp_path / "whole.h5", 500, seed=2, chunk_size=100)
    part = tmp_path / "part.h5"
    simulate_bank("two_moons", part, 300, seed=2, chunk_size=100)
    with h5py.File(part, "a") as f:  # the state an append of chunk 3 leaves if killed mid-commit
        f["theta"].resize(400, axis=0)
        f["x"].resize(400, axis=0)
        f["theta"][300:], f["x"][300:] = whole.read(300, 400)[0].numpy(), whole.read(300, 400)[1].numpy()
        f.attrs["commit"] = np.array([400, 4, 0, 0], dtype=np.int64)
        f.attrs["rows"] = 400  # next_chunk still says 3
    assert SimulationBank(part).rows == 400
    resumed = simulate_bank("two_moons", part, 500, seed=2, chunk_size=100)
    assert resumed.rows == 500 and resumed.content_hash() == whole.content_hash()
    assert int(SimulationBank(part).attrs["next_chunk"]) == 5
