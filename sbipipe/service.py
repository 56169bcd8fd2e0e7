"""The local Prefect server of a project, and how commands find the server they talk to.

The project home (``$SBIPIPE_HOME``, default ``./.sbipipe``) holds the server's ``PREFECT_HOME``
(its SQLite database, unless ``PREFECT_API_DATABASE_CONNECTION_URL`` points elsewhere), its log,
``server.json`` (pid, port, URLs) and the model registry. A server configured with
``PREFECT_API_URL`` takes precedence over the local one. No Prefect import here: the server is a
subprocess and the few API calls are plain HTTP.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import SbipipeError

__all__ = [
    "DEFAULT_PORT",
    "ServerInfo",
    "api_request",
    "check_allowed",
    "configure_prefect",
    "ensure_gpu_limit",
    "gpu_count",
    "healthy",
    "observation_folders",
    "project_home",
    "resolve_api_url",
    "run_url",
    "server_status",
    "start_server",
    "stop_server",
    "ui_url",
]

DEFAULT_PORT = 4200
_STATE = "server.json"


def project_home() -> Path:
    """``$SBIPIPE_HOME`` or ``./.sbipipe``, absolute."""
    return Path(os.environ.get("SBIPIPE_HOME") or ".sbipipe").expanduser().resolve()


@dataclass
class ServerInfo:
    pid: int
    port: int
    api_url: str
    ui_url: str
    database: str
    log: str
    started: str
    already_running: bool = False


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def api_request(api_url: str, method: str, path: str, body: Any = None, timeout: float = 5.0,
                retry_for: float = 30.0) -> Any:
    """One JSON request to a Prefect API; ``None`` for a 404.

    A 503 (the server's database is busy, e.g. SQLite locked while it starts its services) is
    retried with backoff for up to ``retry_for`` seconds before it becomes an error."""
    data = None if body is None else json.dumps(body).encode()
    deadline, wait = time.monotonic() + retry_for, 0.25
    while True:
        req = urllib.request.Request(api_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 503 and time.monotonic() + wait < deadline:
                time.sleep(wait)
                wait = min(2 * wait, 4.0)
                continue
            raise SbipipeError(f"Prefect API {method} {path} answered {exc.code}: {exc.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SbipipeError(f"cannot reach the Prefect API at {api_url} ({getattr(exc, 'reason', exc)}); "
                               "is the server running? (`sbipipe server status`)") from None


def healthy(api_url: str) -> bool:
    """Whether the API answers its health check."""
    try:
        return api_request(api_url, "GET", "/health", timeout=2.0) is True
    except SbipipeError:
        return False


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def server_status(home: Path | None = None) -> ServerInfo | None:
    """The project's local server if its process is alive (stale state is removed), else ``None``."""
    state = (home or project_home()) / _STATE
    try:
        info = ServerInfo(**json.loads(state.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(info.pid) or not _is_prefect(info.pid):
        state.unlink(missing_ok=True)
        return None
    return info


def _is_prefect(pid: int) -> bool:
    """Whether ``pid`` still runs Prefect (not a process that got the number after a reboot)."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc here: trust the pid


def _server_env(home: Path, port: int, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_PROFILE")}
    env.update(
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),  # `--port` alone leaves the UI calling 4200
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_COLORS="false",
    )
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return env


def start_server(home: Path | None = None, port: int | None = None, database_url: str | None = None,
                 timeout: float = 180.0) -> ServerInfo:
    """Start ``prefect server start`` on 127.0.0.1 in the background and wait until it answers.

    Returns the running server unchanged when the project already has one."""
    home = home or project_home()
    running = server_status(home)
    if running is not None:
        running.already_running = True
        return running
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    if port is None:
        port = DEFAULT_PORT if _free(DEFAULT_PORT) else _any_free_port()
    elif not _free(port):
        raise SbipipeError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
    database_url = database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    log_path = home / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*cmd, "server", "start"], env=_server_env(home, port, database_url), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)
    api = f"http://127.0.0.1:{port}/api"
    info = ServerInfo(pid=proc.pid, port=port, api_url=api, ui_url=f"http://127.0.0.1:{port}",
                      database=_redact(database_url) if database_url else f"sqlite:{home / 'prefect' / 'prefect.db'}",
                      log=str(log_path), started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    deadline = time.monotonic() + timeout
    while not healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
            why = "exited" if proc.poll() is not None else f"did not answer within {timeout:.0f} s"
            raise SbipipeError(f"the Prefect server {why}; last log line: {tail[0][:200]} (see {log_path})")
        time.sleep(0.3)
    atomic_write_text(home / _STATE, json.dumps(asdict(info), indent=2) + "\n")
    return info


def _terminate(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def stop_server(home: Path | None = None) -> ServerInfo | None:
    """Stop the project's local server; ``None`` when none was running."""
    home = home or project_home()
    info = server_status(home)
    if info is None:
        return None
    _terminate(info.pid)
    (home / _STATE).unlink(missing_ok=True)
    return info


def resolve_api_url(home: Path | None = None) -> str:
    """``PREFECT_API_URL`` when set, else the project's running local server."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        return configured.rstrip("/")
    info = server_status(home)
    if info is None:
        raise SbipipeError(
            f"no Prefect server: start the local one with `sbipipe server start` (home {home or project_home()}) "
            "or set PREFECT_API_URL"
        )
    return info.api_url


def configure_prefect(home: Path | None = None) -> str:
    """Point this process's Prefect (imported afterwards) at the project's server; return the API URL.

    Never leaves Prefect in its ephemeral no-server mode, which can drop run records."""
    home = home or project_home()
    api = resolve_api_url(home)
    if not healthy(api):
        raise SbipipeError(f"the Prefect API at {api} does not answer its health check; see `sbipipe server status`")
    os.environ["PREFECT_API_URL"] = api
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"  # a lost URL fails loudly instead
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("SBIPIPE_HOME", str(home))
    return api


def ui_url(api_url: str) -> str:
    """The UI's base URL for an API URL (``PREFECT_UI_URL`` when set)."""
    return (os.environ.get("PREFECT_UI_URL") or re.sub(r"/api/?$", "", api_url)).rstrip("/")


def run_url(api_url: str, flow_run_id: Any) -> str:
    return f"{ui_url(api_url)}/runs/flow-run/{flow_run_id}"


def gpu_count() -> int:
    """Visible CUDA devices."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ensure_gpu_limit(api_url: str, limit: int | None = None) -> int:
    """Create the tag concurrency limit ``gpu`` (default: visible GPUs, at least 1) unless it
    exists; return its value."""
    current = api_request(api_url, "GET", "/concurrency_limits/tag/gpu")
    if current is not None and limit is None:
        return int(current["concurrency_limit"])
    value = limit if limit is not None else max(1, gpu_count())
    api_request(api_url, "POST", "/concurrency_limits/", {"tag": "gpu", "concurrency_limit": value})
    return value


def observation_folders(home: Path | None = None) -> list[Path]:
    """Folders observations may be read from: ``$SBIPIPE_OBSERVATION_DIRS`` (``os.pathsep``-separated),
    else the working directory and the project home."""
    raw = os.environ.get("SBIPIPE_OBSERVATION_DIRS")
    folders = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [Path.cwd(), home or project_home()]
    return [p.expanduser().resolve() for p in folders]


def check_allowed(path: str | os.PathLike, folders: list[Path] | None = None) -> Path:
    """``path`` resolved (symlinks too) if it lies inside one of ``folders``; an error otherwise."""
    folders = observation_folders() if folders is None else folders
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(f) for f in folders):
        raise SbipipeError(
            f"observation {str(path)!r} is outside the allowed folders ({', '.join(map(str, folders))}); "
            "move it under one of them or add its folder to SBIPIPE_OBSERVATION_DIRS where the service runs"
        )
    return resolved
