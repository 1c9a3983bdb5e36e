"""``fedmml bench speed``: every setting measured through a run's code path, and the schedules projected."""

import json
from pathlib import Path

import pytest

from fedmml import speed
from fedmml.cli import main
from fedmml.config import load_config


def test_the_settings_and_what_they_run() -> None:
    cfg = load_config("paper-coco")
    chosen = speed.settings(cfg, ["e2e", "lw"], ["fp32", "bf16"], ["real", "memory"], [1, 4], [False])
    # Samples read beforehand only for one client; several clients' workers open their own data.
    assert len(chosen) == 2 * 2 * 3 and not [s for s in chosen if s.loader == "memory" and s.parallel != 1]
    lw = speed.speed_config(cfg, speed.Setting("lw", "bf16", "real", 4, True), 30, Path("/data"))
    assert lw.schedule == "late-heavy" and lw.schedules["late-heavy"].rounds == [0, 0, 0, 0, 0, 2]
    assert lw.federation.num_clients == lw.federation.parallel_clients == 4
    assert lw.data.limit_train == 4 * 30 * 32 and lw.run.compile and lw.model.text.pad_multiple == 8
    assert lw.model.image.pretrained == ""  # the hub is out of reach: the same shapes, random weights
    e2e = speed.speed_config(cfg, speed.Setting("e2e", "fp32", "memory", 1, False), 30, Path("/data"))
    assert e2e.schedule == "uniform" and e2e.data.workers == 0 and e2e.model.text.pad_multiple == 0


def test_the_projection_takes_each_methods_best_rate_with_the_real_loader() -> None:
    cfg = load_config("paper-coco")

    def row(method: str, loader: str, parallel: int, rate: float) -> dict:
        setting = {"method": method, "precision": "bf16", "loader": loader, "parallel": parallel}
        return {**setting, "compile": False, "samples_per_s": rate, "stage": 1, "round1_s": 1.0}

    rows = [row("e2e", "real", 4, 3000.0), row("e2e", "memory", 1, 9000.0)]
    rows.append({**row("lw", "real", 1, 0.0), "error": "boom"})
    projection = speed.project(cfg, rows, speed.COCO_TRAIN)
    e2e = projection["e2e"]
    # 90 rounds of 3 local epochs over COCO's training images at 3,000 samples/s.
    assert e2e["rounds"] == 90 and e2e["setting"] == "e2e-bf16-real-x4"
    assert e2e["hours"] == pytest.approx(90 * 3 * 118_287 / 3000 / 3600, abs=0.01)
    assert "lw" not in projection  # its only setting failed
    table = speed.render_markdown({"rows": rows, "projection": projection})
    assert "e2e-bf16-real-x4" in table and "error: boom" in table


@pytest.mark.slow
def test_bench_speed_on_the_tiny_preset(emoji_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "speed.jsonl"
    # lw alone (e2e runs the same harness): its last late-heavy stage is the one measured.
    args = ["bench", "speed", "--preset", "tiny", "--data", str(emoji_root), "--methods", "lw"]
    # One client at a time: clients at once are the same harness in worker processes (tests/engines/
    # test_parallel.py), and starting those costs more than the rest of this test.
    args += ["--precisions", "fp32", "--loaders", "real", "memory", "--parallel", "1", "--steps", "2"]
    args += ["--set", "run.threads=1", "--json", str(out), "--markdown", str(tmp_path / "speed.md")]
    args += ["--profile", str(tmp_path / "profiles")]
    assert main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows, projection = lines[:-1], lines[-1]["projection"]
    assert [(r["loader"], r["parallel"]) for r in rows] == [("real", 1), ("memory", 1)]
    for row in rows:
        assert "error" not in row, row
        assert (
            row["samples_per_s"] > 0
            and row["clients"] == row["parallel"]
            and row["client_peak_mem_bytes"] > 0
        )
        assert row["stage"] == 3  # its last late-heavy stage
    # The start-up is measured on one client reading its folder.
    assert [r["first_step_s"] is not None for r in rows] == [True, False]
    assert set(projection) == {"lw"} and projection["lw"]["seconds"] > 0
    profiles = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    assert profiles == [f"profile-lw-fp32-{loader}-x1.json" for loader in ("memory", "real")]
    summary = json.loads((tmp_path / "profiles" / "profile-lw-fp32-real-x1.json").read_text())
    assert {"forward", "backward", "optimizer", "load", "other"} <= set(summary["host_ms_per_step"])
    assert "| setting |" in (tmp_path / "speed.md").read_text()
