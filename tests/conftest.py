from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SBIPIPE = str(Path(sys.executable).parent / "sbipipe")


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 120, check: bool = False,
            process: bool = False) -> subprocess.CompletedProcess:
    """Run ``sbipipe ARGS``: in this interpreter through the console entry point ``sbipipe.cli.main``
    (stdout and stderr captured, ``SystemExit`` turned into the return code: no 2–4 s torch import
    per call), or with ``process=True`` as the installed console script in a subprocess."""
    argv = [str(a) for a in args]
    if process:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([SBIPIPE, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        from sbipipe.cli import main

        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
            try:
                main(argv)
            except SystemExit as exc:
                if isinstance(exc.code, str):
                    print(exc.code, file=err)
                code = 1 if isinstance(exc.code, str) else int(exc.code or 0)
        proc = subprocess.CompletedProcess([SBIPIPE, *argv], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"sbipipe {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
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
