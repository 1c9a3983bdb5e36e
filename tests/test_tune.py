"""`fedmml tune`: a grid scored on the validation split, one preset per method, used by `fedmml compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedmml.cli import main
from fedmml.config import load_config


def test_a_grid_larger_than_allowed_is_refused_before_training(tmp_path: Path, capsys) -> None:
    args = ["tune", "--preset", "tiny", "--out", str(tmp_path / "t"), "--max-runs", "5", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # e2e trains the same on both of tiny's schedules (same total rounds and last rates): 3 + 6 + 6 runs.
    assert "the grid needs 15 runs (3 methods, 2 schedules, 3 encoder scales, 1 head scales)" in err
    assert "--max-runs 5" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()
    # Listed after a staged method, e2e still gets its grid (one schedule: it trains the same on both).
    after = ["--methods", "lw", "e2e", "--encoder-scales", "1", "--max-runs", "2"]
    assert main([*args[:5], *after, "--quiet"]) == 2
    assert "the grid needs 3 runs (2 methods, 2 schedules" in capsys.readouterr().err
    # Confirming each method's two best points on two more seeds counts too, and must leave out the grid's.
    confirm = ["--methods", "lw", "--schedules", "uniform", "--confirm-top", "2", "--confirm-seeds", "1", "2"]
    assert main([*args, *confirm]) == 2
    assert "the grid needs 7 runs (1 methods, 1 schedules, 3 encoder scales, 1 head scales; 4 to confirm" in (
        capsys.readouterr().err
    )
    assert main([*args, *confirm[:-2], "0", "1"]) == 2
    assert "--confirm-seeds must leave out run.seed (0)" in capsys.readouterr().err
    vary = ["--vary", "federation.local_epochs=1", "--vary", "federation.local_epochs=2"]
    assert main([*args[:-1], "--methods", "lw", "--schedules", "uniform", *vary]) == 2
    assert "needs 6 runs (1 methods, 1 schedules, 3 encoder scales, 1 head scales, 2 values of " in (
        capsys.readouterr().err
    )
    # A varied key that is not a setting, or a value given twice, fails in one line before any training.
    assert main([*args, "--vary", "federation.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "epochs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*args, *vary[:2], *vary[:2]]) == 2
    assert "--vary federation.local_epochs=1 is given twice" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.slow  # three short training runs
def test_tune_chooses_on_validation_and_compare_runs_the_choice(
    emoji_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "tuned"
    data = ["--set", f'data.root="{emoji_root}"', "--set", "schedules.uniform.rounds=[1, 0, 0]"]
    args = [
        "tune",
        "--preset",
        "tiny",
        "--methods",
        "lw",
        "--encoder-scales",
        "1",
        "4",
        "--schedules",
        "uniform",
    ]
    args += [*data, "--set", "run.threads=1", "--proxy", "data.limit_train=150", "--out", str(out), "--quiet"]
    assert main(args) == 0
    result = json.loads((out / "grid.json").read_text())
    scores = [p["val_rsum"] for p in result["points"]]
    assert len(scores) == 2 and result["best"]["lw"]["val_rsum"] == max(scores)
    for point in result["points"]:
        summary = json.loads((out / "runs" / point["run"] / "summary.json").read_text())
        # The proxy's limit draws from outside the validation split.
        assert summary["eval_split"] == "val" and summary["train_images"] == 150
    assert "✓" in (out / "grid.md").read_text()
    # The preset keeps the user's settings and the chosen rates; the proxy stays out of it.
    chosen = load_config(str(out / "lw.toml"))
    base = load_config("tiny")
    scale = result["best"]["lw"]["encoder_scale"]
    assert chosen.run.method == "lw" and chosen.data.root == str(emoji_root)
    assert chosen.data.limit_train == base.data.limit_train and chosen.eval.split == "test"
    want = [r * scale for r in base.schedules["uniform"].lr["image"]]
    assert chosen.schedules["uniform"].lr["image"] == pytest.approx(want)
    # Extending the grid trains only the new point and chooses over all three.
    trained = {
        p["run"]: (out / "runs" / p["run"] / "summary.json").stat().st_mtime_ns for p in result["points"]
    }
    assert main([*args[:6], "4", "8", *args[8:], "--resume"]) == 0
    extended = json.loads((out / "grid.json").read_text())
    assert [p["encoder_scale"] for p in extended["points"]] == [1, 4, 8]
    for run, mtime in trained.items():
        assert (out / "runs" / run / "summary.json").stat().st_mtime_ns == mtime
    assert extended["best"]["lw"]["val_rsum"] == max(p["val_rsum"] for p in extended["points"])
    # Confirmed on a second seed, the two best points train again and the choice goes by their mean.
    assert main([*args[:6], "4", "8", *args[8:], "--resume", "--confirm-top", "2"]) == 0
    confirmed = json.loads((out / "grid.json").read_text())
    means = {p["run"]: p["val_rsum_mean"] for p in confirmed["points"] if "seeds" in p}
    assert len(means) == 2
    assert all((out / "runs" / f"{run}-seed1" / "summary.json").is_file() for run in means)
    for point in confirmed["points"]:
        if "seeds" in point:
            assert set(point["seeds"]) == {"0", "1"} and point["seeds"]["0"] == point["val_rsum"]
    assert confirmed["best"]["lw"]["run"] == max(means, key=means.get)
    assert "mean over seeds (val)" in (out / "grid.md").read_text()
    assert "over seeds 0, 1" in (out / "lw.toml").read_text()
    scale = confirmed["best"]["lw"]["encoder_scale"]
    want = [r * scale for r in base.schedules["uniform"].lr["image"]]
    cmp_out = tmp_path / "cmp"
    args = ["compare", "--tuned", str(out), "--methods", "lw", "--preset", "tiny", "--out", str(cmp_out)]
    assert main([*args, "--quiet"]) == 0
    used = json.loads((cmp_out / "lw" / "config.json").read_text())
    assert used["schedules"]["uniform"]["lr"]["image"] == pytest.approx(want)
    assert main([*args[:-2], "--methods", "prog", "--out", str(tmp_path / "none"), "--quiet"]) == 2
    # A comparison continued with --resume reads its finished run back; one of another config is refused.
    mtime = (cmp_out / "lw" / "summary.json").stat().st_mtime_ns
    assert main([*args, "--quiet", "--resume"]) == 0
    assert (cmp_out / "lw" / "summary.json").stat().st_mtime_ns == mtime
    assert main([*args, "--quiet", "--resume", "--set", "run.seed=5"]) == 2
    assert "holds a run of another config (differs at run.seed)" in capsys.readouterr().err
    # A run stopped before its first checkpoint has nothing to continue from: --resume starts it again.
    shutil.rmtree(cmp_out / "lw" / "checkpoints")
    (cmp_out / "lw" / "summary.json").unlink()
    assert main([*args, "--quiet", "--resume"]) == 0
    assert (cmp_out / "lw" / "summary.json").is_file()


@pytest.mark.slow  # two short training runs
def test_a_varied_setting_is_a_grid_axis_and_its_choice_goes_into_the_preset(
    emoji_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tuned"
    args = ["tune", "--preset", "tiny", "--methods", "lw", "--encoder-scales", "1", "--schedules", "uniform"]
    args += ["--set", f'data.root="{emoji_root}"', "--set", "schedules.uniform.rounds=[1, 0, 0]"]
    args += ["--set", "run.threads=1", "--proxy", "data.limit_train=150", "--out", str(out), "--quiet"]
    args += ["--vary", "federation.local_epochs=1", "--vary", "federation.local_epochs=2"]
    assert main(args) == 0
    result = json.loads((out / "grid.json").read_text())
    runs = [p["run"] for p in result["points"]]
    assert runs == ["lw-uniform-enc1-heads1-local_epochs1", "lw-uniform-enc1-heads1-local_epochs2"]
    for point in result["points"]:
        used = json.loads((out / "runs" / point["run"] / "config.json").read_text())
        assert [["federation.local_epochs", used["federation"]["local_epochs"]]] == point["vary"]
    best = result["best"]["lw"]
    assert (
        load_config(str(out / "lw.toml")).federation.local_epochs
        == dict(best["vary"])["federation.local_epochs"]
    )
    assert "`federation.local_epochs`" in (out / "grid.md").read_text()
    # Extended with --resume, the varied points are read back, not trained again.
    assert main([*args, "--resume"]) == 0
    assert [p["run"] for p in json.loads((out / "grid.json").read_text())["points"]] == runs
