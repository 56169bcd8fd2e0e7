"""The installed ``sbipipe`` console script: output and one-line errors."""

from __future__ import annotations

import h5py

from .conftest import assert_one_line_error, run_cli


def test_simulators_lists_names_parameters_and_priors():
    proc = run_cli("simulators", check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "parameters"]
    row = next(l for l in lines if l.split()[0] == "two_moons")
    assert "theta1, theta2" in row and "Uniform(-1, 1)^2" in row and "exact" in row


def test_simulate_then_bank_info(tmp_path):
    bank = tmp_path / "b.h5"
    proc = run_cli("simulate", "two_moons", "-n", "3000", "-o", bank, "--seed", "4", "--chunk-size", "1000", check=True)
    assert "3000 rows of two_moons v1" in proc.stdout
    assert proc.stderr == ""  # no progress bar when not on a terminal
    with h5py.File(bank, "r") as f:
        assert f["theta"].shape == (3000, 2) and f.attrs["seed"] == 4
    info = run_cli("bank", "info", bank, check=True).stdout
    for fragment in ("rows", "3000", "two_moons", "dropped", "theta1", "min", "mean", "max"):
        assert fragment in info
    # extension through the CLI keeps the stored seed
    run_cli("simulate", "two_moons", "-n", "5000", "-o", bank, check=True)
    with h5py.File(bank, "r") as f:
        assert f["theta"].shape == (5000, 2)


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path):
    bank = tmp_path / "b.h5"
    run_cli("simulate", "two_moons", "-n", "10", "-o", bank, check=True)
    # the installed console script itself, in a subprocess; the other cases run in this interpreter
    assert_one_line_error(run_cli("simulate", "nosuch", "-n", "5", "-o", tmp_path / "x.h5", process=True),
                          "unknown simulator", "two_moons")
    assert_one_line_error(run_cli("simulate", "nomodule_xyz:Sim", "-n", "5", "-o", tmp_path / "x.h5"), "cannot import")
    assert_one_line_error(run_cli("simulate", "two_moons", "-n", "0", "-o", tmp_path / "x.h5"), "positive")
    assert_one_line_error(run_cli("simulate", "two_moons", "-n", "-3", "-o", tmp_path / "x.h5"), "positive")
    assert_one_line_error(run_cli("simulate", "slcp", "-n", "20", "-o", bank), "refusing to append slcp")
    assert_one_line_error(run_cli("simulate", "two_moons", "-n", "5", "-o", tmp_path), "is a folder")
    junk = tmp_path / "junk.h5"
    junk.write_text("garbage")
    assert_one_line_error(run_cli("bank", "info", junk), "corrupt or not a bank")
    assert_one_line_error(run_cli("simulate", "two_moons", "-n", "5", "-o", junk / "x.h5"), "cannot create the output folder")
    assert_one_line_error(run_cli("bank", "info", tmp_path / "missing.h5"), "does not exist")
    assert_one_line_error(run_cli("simulate", "two_moons", "-o", tmp_path / "x.h5"), "Missing option '-n'")
    assert run_cli("--version", process=True).stdout.startswith("sbipipe ")
