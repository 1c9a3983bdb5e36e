"""Peak RSS of the ServerApp and of each node when the clients hold 1x and 5x the emoji training images.

.venv/bin/python benchmarks/data_placement.py --data data/emoji --out runs/placement

Runs ``fedmml deploy --node-data`` (loopback, TLS, three SuperNodes) twice on the tiny model with every
training image of the emoji set split over three client folders, and a server folder holding only the test
split. In the second run node 0's folder lists every image of its share five times (new ids, the same
files), so node 0 holds 5x the samples while nodes 1 and 2 stay as they were. While a run goes on, the peak
RSS (``VmHWM``) of every Flower process is sampled from /proc: the ServerApp (``flwr-serverapp``) alone, and
each node's ClientApp processes, attributed to a node through their parent SuperExec and SuperNode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedmml.client_data import SharedSplit
from fedmml.config import load_config

NODES = 3


def _write(src: Path, dst: Path, split: str, ids: list[int], copies: int = 1) -> None:
    """A COCO-layout folder listing ``ids`` of ``src``'s split ``copies`` times (new ids, the same images)."""
    data = json.loads((src / f"captions_{split}.json").read_text())
    keep = set(ids)
    images = [im for im in data["images"] if im["id"] in keep]
    notes = [a for a in data["annotations"] if a["image_id"] in keep]
    offset = max(im["id"] for im in data["images"]) + 1
    out_images, out_notes = [], []
    for copy in range(copies):
        out_images += [{**im, "id": im["id"] + copy * offset} for im in images]
        out_notes += [{**a, "image_id": a["image_id"] + copy * offset} for a in notes]
    for im in images:
        target = dst / "images" / im["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "images" / im["file_name"], target)
    (dst / f"captions_{split}.json").write_text(json.dumps({"images": out_images, "annotations": out_notes}))


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _node_of(pid: int) -> str | None:
    """The partition-id of the SuperNode above ``pid``, if any."""
    while pid > 1:
        cmd = _cmdline(pid)
        if "flower-supernode" in cmd and "partition-id=" in cmd:
            return cmd.split("partition-id=")[1].split()[0]
        pid = int(_status(pid).get("PPid", "0").strip() or 0)
    return None


class Sampler(threading.Thread):
    """Peak VmHWM (KiB) of the ServerApp and of each node's ClientApp processes, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                cmd = _cmdline(int(entry.name))
                if "flwr-serverapp" in cmd:
                    who = "serverapp"
                elif "flwr-clientapp" in cmd:
                    who = f"node{_node_of(int(entry.name))}"
                else:
                    continue
                peak = int(_status(int(entry.name)).get("VmHWM", "0 kB").split()[0])
                self.peaks[who] = max(self.peaks.get(who, 0), peak)
            time.sleep(0.2)


def _deploy(folders: list[Path], server: Path, out: Path) -> tuple[dict, dict[str, int]]:
    sampler = Sampler()
    sampler.start()
    cmd = [sys.executable, "-m", "fedmml.cli", "deploy", "--preset", "tiny", "--quiet", "--out", str(out)]
    cmd += ["--node-data", *map(str, folders)]
    for item in (f'data.root="{server}"', "data.limit_train=0", "schedules.uniform.rounds=[1, 1, 0]"):
        cmd += ["--set", item]
    cmd += ["--set", "eval.every=0", "--set", "run.threads=1", "--overwrite"]
    subprocess.run(cmd, check=True)
    sampler.stop.set()
    sampler.join()
    return json.loads((out / "summary.json").read_text()), sampler.peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--out", type=Path, default=Path("runs/placement"))
    args = parser.parse_args()
    src = args.data.resolve()
    out = args.out.resolve()
    cfg = load_config("tiny", [f'data.root="{src}"', "data.limit_train=0", f"federation.num_clients={NODES}"])
    shared = SharedSplit(cfg)
    server = out / "server"
    if not server.exists():
        test = json.loads((src / "captions_test.json").read_text())
        _write(src, server, "test", [im["id"] for im in test["images"]][: cfg.data.limit_test])
    results = {}
    for scale in (1, 5):
        folders = []
        for cid, part in enumerate(shared.parts):
            folder = out / f"x{scale}" / f"client{cid}"
            if not folder.exists():
                copies = scale if cid == 0 else 1
                _write(src, folder, "train", [shared.index.image_ids[i] for i in part], copies)
            folders.append(folder)
        summary, peaks = _deploy(folders, server, out / f"run-x{scale}")
        results[f"x{scale}"] = {"client_samples": summary["client_samples"], "peak_rss_mib": peaks}
        print(json.dumps({f"x{scale}": results[f"x{scale}"]}), flush=True)
    ratio = results["x5"]["peak_rss_mib"]["serverapp"] / results["x1"]["peak_rss_mib"]["serverapp"]
    for run in results.values():
        run["peak_rss_mib"] = {k: round(v / 1024, 1) for k, v in sorted(run["peak_rss_mib"].items())}
    print(json.dumps({"serverapp_ratio_x5_over_x1": round(ratio, 4), **results}, indent=2))


if __name__ == "__main__":
    main()
