"""Submit a run with the ``flwr`` CLI and follow it by Flower's own run state, never by an exit code.

``flwr run`` exits 0 even when the run failed, so the outcome is read from ``flwr ls --format json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmml import interrupts
from fedmml.engines.flower.processes import tool
from fedmml.events import Listener, RoundDone, RoundStarted

# `flwr run` exits 0 and prints only "check your network connection" for many failures (a wrong CA among
# them), so every failure is reported with this hint.
HINT = (
    "flwr exits 0 even when it fails: check the SuperLink address and port, the CA certificate "
    "(root-certificates) and the log in <run>/flwr/logs"
)


class FlowerError(RuntimeError):
    """Flower refused or failed a command or a run; the message says what Flower said and where to look."""


# The app's run config keys and defaults; `flwr run -c` may only set keys listed here.
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "overrides": "",
    "config-file": "",
    "run-dir": "",
    "node-wait-timeout": 120,
    "first-round-timeout": 900,
    "round-timeout": 300,
    "resume": False,
}


def write_app(app_dir: Path) -> Path:
    """A minimal Flower app whose components are fedmml's ServerApp and ClientApp (no code of its own)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    # JSON spells strings, numbers and booleans as TOML does.
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in RUN_CONFIG_DEFAULTS.items())
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "fedmml-app"\nversion = "0.1.0"\ndependencies = ["fedmml[flower]"]\n\n'
        '[tool.flwr.app]\npublisher = "fedmml"\n\n[tool.flwr.app.components]\n'
        'serverapp = "fedmml.engines.flower.server_app:app"\n'
        'clientapp = "fedmml.engines.flower.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )
    return app_dir


def write_connection(home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, made the default."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {json.dumps(str(root_certificates))}"
        if root_certificates
        else "insecure = true"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )


def flwr(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One ``flwr`` CLI call; raises with its output if it fails."""
    try:
        proc = subprocess.run(
            [tool("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise FlowerError(f"flwr {' '.join(args[:2])} did not answer within {timeout:g} s; {HINT}") from None
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())
        raise FlowerError(f"flwr {' '.join(args[:2])} failed ({proc.returncode}): {said}; {HINT}")
    return proc


def _json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    # Warnings may precede the JSON document on stdout.
    text = proc.stdout
    if "{" not in text:
        raise FlowerError(f"flwr answered without a result: {' '.join((text + proc.stderr).split())}; {HINT}")
    return json.loads(text[text.index("{") :])


def submit(
    app_dir: Path,
    connection: str,
    env: dict[str, str],
    run_config: dict[str, Any],
    federation_config: str = "",
) -> int:
    """Start the app on the connection's SuperLink; return the run id.

    ``app_dir`` may be any Flower app directory, this repository included: nothing is written into it.
    """
    # A file rather than `-c 'k=v ...'`, so that paths and overrides need no shell-style quoting.
    overrides = Path(env["FLWR_HOME"]) / "run-config.toml"
    overrides.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in run_config.items()) + "\n")
    args = ["run", str(app_dir), connection, "--format", "json", "-c", str(overrides)]
    if federation_config:
        args += ["--federation-config", federation_config]
    out = _json_out(flwr(args, env))
    if not out.get("success"):
        said = out.get("error-message") or out
        raise FlowerError(f"flwr run did not start a run: {said}; {HINT}")
    return int(out["run-id"])


def run_info(run_id: int, connection: str, env: dict[str, str]) -> dict[str, Any]:
    """Flower's record of one run (status, elapsed time, network traffic, ...)."""
    out = _json_out(flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env))
    return out["runs"][0]


def wait_for_run(
    run_id: int,
    connection: str,
    env: dict[str, str],
    timeout: float,
    tick: Callable[[], None] = lambda: None,
    poll: float = 2.0,
) -> dict[str, Any]:
    """Poll the run until Flower reports it finished; returns its record (``status`` tells how)."""
    deadline = time.monotonic() + timeout
    while True:
        interrupts.raise_if_lost()  # each poll drops a Popen, whose finalizer may have swallowed a Ctrl-C
        info = run_info(run_id, connection, env)
        tick()
        if str(info.get("status", "")).startswith("finished"):
            return info
        if time.monotonic() > deadline:
            flwr(["stop", str(run_id), connection], env)
            raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s (stopped)")
        time.sleep(poll)


def save_log(run_id: int, connection: str, env: dict[str, str], path: Path) -> None:
    """The run's log as Flower kept it (ServerApp output), for post-mortems."""
    try:
        proc = subprocess.run(
            [tool("flwr"), "log", str(run_id), connection, "--show"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        path.write_text(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        path.write_text("flwr log timed out\n")


class MetricsFollower:
    """Replays new lines of the ServerApp's metrics.jsonl as round events to a local listener; ``describe``
    gives a record's headline scores as text (or "" when it holds none)."""

    def __init__(
        self, path: Path, rounds: int, listener: Listener | None, describe: Callable[[dict[str, Any]], str]
    ) -> None:
        self.path = path
        self.rounds = rounds
        self.listener = listener
        self.describe = describe
        self.seen = 0

    def __call__(self) -> None:
        """Forward the rounds finished since the last call."""
        if self.listener is None or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        for line in lines[self.seen :]:
            record = json.loads(line)
            self.listener(RoundStarted(record["round"], self.rounds, record["clients"]))
            self.listener(RoundDone(record, self.describe(record)))
        self.seen = len(lines)
