from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SBIPIPE = str(Path(sys.executable).parent / "sbipipe")


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed ``sbipipe`` console script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([SBIPIPE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"sbipipe {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield
