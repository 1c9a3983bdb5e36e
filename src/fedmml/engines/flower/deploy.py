"""A real Flower deployment on loopback: one SuperLink and one SuperNode per client, TLS and node auth on.

Every SuperNode has its own Flower home, authentication key and ``--node-config`` (its partition). With
``insecure=True`` (only when asked) there is neither TLS nor node authentication.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmml.config import Config
from fedmml.engines.flower import control
from fedmml.engines.flower.credentials import make_node_key, make_tls
from fedmml.engines.flower.launch import CONNECTION, follow_run, prepare, start_superlink
from fedmml.engines.flower.processes import ProcessGroup, flower_env, free_port, tool
from fedmml.events import Listener


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, all owned by ``procs``."""

    home: Path
    procs: ProcessGroup
    insecure: bool = False
    port: int = 0
    tls: dict[str, Path] = field(default_factory=dict)

    def start(self) -> None:
        """Start the SuperLink (with TLS and node authentication unless insecure) and point the CLI at it."""
        if self.insecure:
            extra = ["--insecure"]
        else:
            self.tls = make_tls(self.home / "certs")
            extra = ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"])]
            extra += ["--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth"]
        self.port = start_superlink(self.procs, self.home, extra)
        control.write_connection(self.home, CONNECTION, f"127.0.0.1:{self.port}", self.tls.get("ca"))

    def node_key(self, name: str, register: bool = True) -> Path | None:
        """A new key for SuperNode ``name``, registered with the SuperLink unless ``register`` is False."""
        if self.insecure:
            return None
        private, public = make_node_key(self.home / "keys", name)
        if register:
            control.flwr(["supernode", "register", str(public), CONNECTION, "--name", name], self.procs.env)
        return private

    def start_node(
        self, partition: int, partitions: int, key: Path | None, data_root: str = "", name: str = ""
    ) -> subprocess.Popen:
        """A SuperNode for one partition, with its own Flower home and local Runtime API port."""
        name = name or f"supernode-{partition}"
        node_config = f"partition-id={partition} num-partitions={partitions}"
        if data_root:
            node_config += f' data-root="{data_root}"'
        argv = [tool("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())]
        argv += ["--node-config", node_config, "--max-retries", "3"]
        if self.insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls["ca"])]
            if key is not None:
                argv += ["--auth-supernode-private-key", str(key)]
        return self.procs.start(name, argv, env=flower_env(self.home / "nodes" / name))

    def start_nodes(self, count: int, roots: list[str] | None = None) -> list[subprocess.Popen]:
        """One registered SuperNode per partition, each given only its own data folder when ``roots``."""
        folders = roots or [""] * count
        return [self.start_node(i, count, self.node_key(f"node{i}"), folders[i]) for i in range(count)]


def run_deployment(
    cfg: Config, out_dir: Path, listener: Listener | None = None, insecure: bool = False, resume: bool = False
) -> dict[str, Any]:
    """The experiment across a loopback SuperLink and ``num_clients`` SuperNodes; returns the summary.

    Under ``partition.kind = "local"`` node i is started with ``data.client_roots[i]`` as its own folder
    (``data-root`` in its node config) and sees no other; the ServerApp needs only a test split.
    """
    out_dir, home, env = prepare(cfg, out_dir)
    roots = [str(Path(r).resolve()) for r in cfg.data.client_roots] if cfg.partition.kind == "local" else None
    with ProcessGroup(home / "logs", env) as procs:
        deployment = LocalDeployment(home, procs, insecure)
        deployment.start()
        deployment.start_nodes(cfg.federation.num_clients, roots)
        summary = follow_run(cfg, out_dir, home, env, listener, resume=resume)
    summary["flower"]["security"] = "insecure" if insecure else "tls+node-auth"
    return summary
