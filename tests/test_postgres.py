"""`sbipipe server start` on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL), once, against a real
PostgreSQL cluster started here (Debian's `postgresql` package; `.ci/run` installs it). Also
covers `server stop`."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sbipipe.service import api_request, server_status

from .service_helpers import BIN, REPO, free_port


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


PG = _pg_bin()
pytestmark = pytest.mark.skipif(PG is None, reason="needs PostgreSQL binaries (Debian package `postgresql`; .ci/run installs it)")


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool (as the `postgres` user when we are root: initdb refuses root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def postgres():
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser to drop to the postgres user")
    root = Path(tempfile.mkdtemp(prefix="sbipipe-pg-"))  # not under pytest's root-only folder
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (root, sock):
            shutil.chown(path, "postgres")
    port = free_port()
    proc = _as_postgres([str(PG / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    assert proc.returncode == 0, proc.stderr
    proc = _as_postgres([str(PG / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
                         f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
    assert proc.returncode == 0, proc.stderr + (root / "pg.log").read_text()
    try:
        proc = _as_postgres([str(PG / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"])
        assert proc.returncode == 0, proc.stderr
        yield {"url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", "port": port}
    finally:
        _as_postgres([str(PG / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def test_server_on_postgresql_writes_there_then_stops(postgres, tmp_path):
    env = {**os.environ, "SBIPIPE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(key, None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "sbipipe"), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    started = cli("server", "start", "--port", str(free_port()), "--database-url", postgres["url"])
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        assert f"database postgresql+asyncpg://postgres@127.0.0.1:{postgres['port']}/prefect" in started.stdout
        api = re.search(r"API (\S+)", started.stdout).group(1)
        flow = api_request(api, "POST", "/flows/", {"name": "written-to-postgresql"})
        rows = _as_postgres([str(PG / "psql"), "-h", "127.0.0.1", "-p", str(postgres["port"]), "-U", "postgres",
                             "-d", "prefect", "-Atc", f"select name from flow where id = '{flow['id']}'"])
        assert rows.returncode == 0 and rows.stdout.strip() == "written-to-postgresql", rows.stdout + rows.stderr
    finally:
        stopped = cli("server", "stop")
    assert stopped.returncode == 0 and "Prefect server stopped" in stopped.stdout
    assert server_status(tmp_path / "home") is None
