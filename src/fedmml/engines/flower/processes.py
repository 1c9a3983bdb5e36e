"""Start Flower's processes and stop every one of them, by its own id, whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType

# Every process a group starts carries this variable, and so do the processes they start in turn.
MARKER = "FEDMML_PROCESS_GROUP"


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something listens on ``127.0.0.1:port``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: run-local home, no telemetry, no update check, no installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # Otherwise `uv sync` installs the app's dependencies per run (here: a CUDA torch over the network).
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        # Flower starts its helpers (flower-superexec, flwr-clientapp, ...) by name: use this environment's.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def tool(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def processes_with(variable: str) -> list[int]:
    """Ids of live processes whose environment holds ``variable`` ("NAME=value"); empty without ``/proc``."""
    needle = variable.encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


class ProcessGroup:
    """Processes started for one run; leaving the ``with`` block (normally, on error or Ctrl-C) stops all.

    Each process leads its own session, so stopping it by its id also reaches the helpers it spawned in that
    session. Some helpers start sessions of their own (Flower's SuperExec, and with it the simulation
    runtime and Ray), and outlive their parent; they are found by a marker in their environment, which
    every process started here passes on, and stopped by their ids as well (where ``/proc`` exists).
    """

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.token = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` with its output in ``<logs>/<name>.log`` (``env`` replaces the group's)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**(env or self.env), MARKER: self.token}
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the process's group, then SIGKILL what is left after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; helpers left in its group still get the stronger signal.
            if sig is signal.SIGTERM:
                time.sleep(0.2)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break

    def strays(self) -> list[int]:
        """Ids of live processes that carry this group's marker (empty where there is no ``/proc``)."""
        return processes_with(f"{MARKER}={self.token}")

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process started here, the last started first, then whatever they left behind."""
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.strays()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while left and self.strays() and time.monotonic() < deadline:
                time.sleep(0.2)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
