"""The command line end to end with the tiny preset on real emoji images, and its error messages."""

import json
import math
from pathlib import Path

import pytest

from fedmml.cli import main

SUMMARY_KEYS = {
    "method", "preset", "rounds", "stages", "clients", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
    "t2i_r10", "rsum", "bytes_up_total", "bytes_down_total", "wall_s",
}  # fmt: skip
ROUND_KEYS = {"round", "stage", "method", "clients", "train_loss", "bytes_up", "bytes_down", "wall_s"}
ROUND_KEYS |= {"client_s"}


def _data(root: Path) -> list[str]:
    return ["--set", f'data.root="{root}"']


@pytest.fixture(scope="module")
def compared(emoji_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cmp"
    assert main(["compare", "--preset", "tiny", *_data(emoji_root), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("method", ["e2e", "lw", "prog"])
@pytest.mark.slow  # shares the compare fixture: three training runs
def test_every_method_runs_end_to_end(compared: Path, method: str) -> None:
    run = compared / method
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "report.md"):
        assert (run / name).is_file(), name
    assert list((run / "plots").glob("*.png"))
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["method"] == method
    assert all(0 <= summary[k] <= 100 for k in ("i2t_r1", "t2i_r10"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["rounds"] == 3
    assert all(ROUND_KEYS <= set(r) and math.isfinite(r["train_loss"]) for r in records)
    assert "rsum" in records[-1] and records[-1]["rsum"] == summary["rsum"]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in records)


@pytest.mark.slow  # shares the compare fixture: three training runs
def test_comparison_files_and_byte_saving(compared: Path) -> None:
    comparison = json.loads((compared / "comparison.json").read_text())
    assert set(comparison) == {"e2e", "lw", "prog"}
    for method, entry in comparison.items():
        assert entry["seeds"] == {"0": json.loads((compared / method / "summary.json").read_text())}
    up = {method: entry["mean"]["bytes_up_total"] for method, entry in comparison.items()}
    assert up["lw"] * 2 <= up["e2e"] and up["lw"] < up["prog"]
    assert comparison["lw"]["vs_e2e"]["bytes_up_total"]["mean"] == up["lw"] / up["e2e"]
    assert (compared / "comparison.md").read_text().count("|") > 10


@pytest.mark.slow  # four short training runs
def test_compare_over_seeds(emoji_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    args = ["compare", "--preset", "tiny", *_data(emoji_root), "--out", str(out), "--quiet"]
    args += ["--methods", "e2e", "lw", "--seeds", "0", "1", "--set", "schedules.uniform.rounds=[1, 0, 0]"]
    assert main(args) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    for method in ("e2e", "lw"):
        for seed in (0, 1):
            summary = json.loads((out / f"seed-{seed}" / method / "summary.json").read_text())
            assert summary["seed"] == seed and comparison[method]["seeds"][str(seed)] == summary
    # Within a seed both methods trained the same clients; across seeds the partitions differ.
    e2e = comparison["e2e"]["seeds"]
    assert e2e["0"]["client_samples"] == comparison["lw"]["seeds"]["0"]["client_samples"]
    assert e2e["0"]["rsum"] != e2e["1"]["rsum"]
    ratio = comparison["lw"]["vs_e2e"]["rsum"]
    assert ratio["n"] == 2 and ratio["low"] < ratio["mean"] < ratio["high"]
    assert "mean ± sd over seeds 0, 1" in (out / "comparison.md").read_text()


@pytest.mark.slow  # shares the compare fixture: three training runs
def test_evaluate_reproduces_the_final_scores(compared: Path, emoji_root: Path, capsys) -> None:
    assert main(["evaluate", "--run", str(compared / "lw"), "--data", str(emoji_root)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((compared / "lw" / "summary.json").read_text())
    assert scores["rsum"] == pytest.approx(summary["rsum"], abs=1e-4)
    assert scores["images"] == summary["test_images"]


def test_dirichlet_partition_run(emoji_root: Path, tmp_path: Path) -> None:
    args = [
        "run",
        "--preset",
        "tiny",
        "--method",
        "lw",
        *_data(emoji_root),
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    args += ["--set", 'partition.kind="dirichlet"', "--set", "partition.alpha=0.5"]
    args += ["--set", "schedules.uniform.rounds=[1, 0, 0]"]
    assert main(args) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1


def test_help_explains_methods(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "LW-FedMML" in out and "fedmml data prepare emoji" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--preset", "tiny", "--set", 'data.root="/nonexistent/emoji"'], "fedmml data prepare emoji"),
        (["run", "--preset", "nope"], "valid presets"),
        (["run", "--preset", "tiny", "--set", "federation.clients=3"], "valid keys under federation"),
        (["run", "--preset", "tiny", "--schedule", "fast"], "valid schedules"),
        (
            ["run", "--preset", "tiny", "--set", "schedules.uniform.blocks.image=[4, 4, 4]"],
            "adds 12 image blocks, but the image encoder has only 6",
        ),
    ],
)
def test_bad_input_is_one_clear_line(emoji_root: Path, tmp_path: Path, capsys, args, message) -> None:
    assert main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_malformed_captions_and_unwritable_output_are_one_line_errors(tmp_path: Path, capsys) -> None:
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    for split in ("train", "test"):
        (root / f"captions_{split}.json").write_text("{not json")
    args = [
        "run",
        "--preset",
        "tiny",
        "--quiet",
        "--set",
        f'data.root="{root}"',
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 2
    assert "cannot parse captions file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--preset", "tiny", "--quiet", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the run directory" in " ".join(err.split()) and "Traceback" not in err
