"""docs/flower.md's multi-machine walk-through, run as written on loopback: certificates, a TLS SuperLink
with node authentication, registered SuperNodes that each point at their own folder, the resolved config
and ``flwr run .`` of this repository. The doc's code blocks are read from the file itself; only the
addresses, ports and paths a reader would put in are replaced."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from fedmml.config import config_from_dict
from fedmml.engines.flower import control
from fedmml.engines.flower.credentials import make_node_key, make_tls
from fedmml.engines.flower.processes import flower_env, free_port, wait_for_port
from fedmml.experiment import build_setup
from fedmml.runs import read_metrics

pytestmark = pytest.mark.slow  # a real deployment: minutes

REPO = Path(__file__).parents[2]
SECTION = re.compile(r"^## SuperNodes on other machines.*?(?=^## )", re.S | re.M)
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the section, dedented."""
    section = SECTION.search((REPO / "docs" / "flower.md").read_text()).group(0)
    return [
        (lang, "\n".join(line[3:] for line in code.splitlines())) for lang, code in BLOCK.findall(section)
    ]


def _register_command() -> str:
    section = SECTION.search((REPO / "docs" / "flower.md").read_text()).group(0)
    return re.search(r"`(flwr supernode register [^`]+)`", section).group(1)


def _bash(code: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A doc block in bash, in its own session so that it can be stopped with everything it started."""
    return subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_the_multi_machine_walk_through_runs_as_written(client_folders: dict, tmp_path: Path) -> None:
    (py, certs), (_, superlink), (_, connection), (_, supernode), (_, submit) = _blocks()
    assert (py, _blocks()[2][0]) == ("python", "toml")
    link, node_ports = free_port(), [free_port() for _ in range(3)]
    # A reader's activated virtual environment: the project's and Flower's programs on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started: list[subprocess.Popen] = []
    try:
        # 1. Certificates and node keys, on the SuperLink host (here: loopback).
        host = tmp_path / "link"
        host.mkdir()
        code = certs.replace('hosts=("link.example.org", "10.0.0.5")', 'hosts=("localhost", "127.0.0.1")')
        subprocess.run([sys.executable, "-c", code], cwd=host, env=env, check=True)
        # 2. The SuperLink.
        code = superlink.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("9191", str(link))
        started.append(_bash(code, host, env))
        wait_for_port(link, 60, started[-1])
        # 3. The CLI's connection, and every node's key registered.
        home = host / "flwr"
        toml = connection.replace("link.example.org:9191", f"127.0.0.1:{link}")
        (home / "config.toml").write_text(
            toml.replace("/abs/path/certs/ca.crt", str(host / "certs" / "ca.crt"))
        )
        cli_env = flower_env(home) | {"PATH": env["PATH"]}
        for i in range(3):
            register = _register_command().replace("node0", f"node{i}")
            subprocess.run(["bash", "-c", register], cwd=host, env=cli_env, check=True, capture_output=True)
        # 4. One SuperNode per "machine", each with the CA, its own key and its own folder.
        for i, (folder, port) in enumerate(zip(client_folders["clients"], node_ports, strict=True)):
            machine = tmp_path / f"machine{i}"
            machine.mkdir()
            shutil.copy(host / "certs" / "ca.crt", machine)
            shutil.copy(host / "keys" / f"node{i}", machine)
            code = supernode.replace("link.example.org:9191", f"127.0.0.1:{link}").replace(
                "node0", f"node{i}"
            )
            code = code.replace("--port 9094", f"--port {port}").replace(
                "partition-id=0", f"partition-id={i}"
            )
            started.append(_bash(code.replace("/data/my-photos", folder), machine, env))
        # A node whose key was never registered is refused; a CLI that trusts another CA gets a clear error.
        intruder = tmp_path / "intruder"
        make_node_key(intruder, "node0")
        shutil.copy(host / "certs" / "ca.crt", intruder)
        code = supernode.replace("link.example.org:9191", f"127.0.0.1:{link}").replace(
            "9094", str(free_port())
        )
        refused = _bash(code.replace("/data/my-photos", client_folders["clients"][0]), intruder, env)
        assert refused.wait(timeout=120) != 0
        assert b"Failed to activate SuperNode" in refused.stdout.read()
        stranger = flower_env(tmp_path / "stranger")
        wrong_ca = make_tls(tmp_path / "stranger-certs")["ca"]
        control.write_connection(Path(stranger["FLWR_HOME"]), "fedmml", f"127.0.0.1:{link}", wrong_ca)
        with pytest.raises(control.FlowerError, match="exits 0 even when it fails.*CA certificate"):
            control.submit(
                control.write_app(tmp_path / "app"), "fedmml", stranger, {"run-dir": str(tmp_path)}
            )
        # 5. The resolved config and the run, from this repository (`flwr ls` is a reader's follow-up).
        config, out = tmp_path / "run-config.json", tmp_path / "runs" / "x"
        code = submit.replace("/data/server-test", str(client_folders["server"]))
        code = code.replace("/abs/run-config.json", str(config)).replace("/abs/runs/x", str(out))
        # One round instead of the preset's three: each message starts a ClientApp process (torch and
        # transformers imported anew), so a round costs half a minute of start-up on two cores. A node holding
        # a stage's frozen tensors across rounds is tested by test_deploy.py and test_flower.py.
        code = code.replace(" > ", " --set 'schedules.uniform.rounds=[1, 0, 0]' > ", 1)
        code = "\n".join(line for line in code.splitlines() if not line.startswith("flwr ls"))
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code], cwd=REPO, env=cli_env, capture_output=True
        )
        assert done.returncode == 0, done.stderr.decode()
        run_id = int(json.loads(done.stdout[done.stdout.index(b"{") :])["run-id"])
        info = control.wait_for_run(run_id, "fedmml", cli_env, timeout=600)
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    assert info["status"] == "finished:completed"
    assert not (REPO / "run-config.toml").exists()  # `flwr run .` left the repository as it was
    records = read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 1, 2]] * len(records)
    # The same seeded run in-process, with the same folders, sends the same bytes. Uploads may differ by a few
    # header bytes: a deployment starts a fresh ClientApp process per message, which fills its frozen-prefix
    # cache anew where an in-process client extends the one it kept, and the reply reports that work.
    tree = json.loads(config.read_text())
    assert tree["partition"]["kind"] == "local" and tree["run"]["engine"] == "flower"
    tree["run"]["engine"], tree["data"]["client_roots"] = "inprocess", client_folders["clients"]
    expected = build_setup(config_from_dict(tree)).run_rounds()
    for got, want in zip(records, expected, strict=True):
        assert got["bytes_down"] == want["bytes_down"]
        assert abs(got["bytes_up"] - want["bytes_up"]) <= 16 * len(want["clients"])
