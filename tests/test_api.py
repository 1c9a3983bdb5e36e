"""The Python API: the README's example runs as written; callbacks see the run; the command uses the same."""

import json
import os
import re
from pathlib import Path

import pytest

import fedmml
from fedmml.cli import main

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_python_example_runs_as_written(
    emoji_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "emoji").symlink_to(emoji_root)
    monkeypatch.chdir(tmp_path)
    code = _readme_example()
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the example is the test
    summary, losses = names["summary"], names["losses"]
    records = [json.loads(line) for line in (tmp_path / "runs/api-lw/metrics.jsonl").read_text().splitlines()]
    assert losses == [r["train_loss"] for r in records] and len(losses) == summary["rounds"]
    assert names["table"]["lw"]["vs_e2e"]["rsum"]["mean"] > 0
    assert (tmp_path / "runs/api-compare/comparison.md").is_file()
    shown = capsys.readouterr().out.splitlines()
    assert json.loads(shown[1].replace("'", '"'))["rsum"] == pytest.approx(summary["rsum"])  # evaluate


def test_overrides_as_a_mapping_equal_the_command_lines(emoji_root: Path) -> None:
    mapped = fedmml.load_config("tiny", {"data.root": str(emoji_root), "schedules.uniform.rounds": [1, 1, 0]})
    strings = fedmml.load_config("tiny", [f'data.root="{emoji_root}"', "schedules.uniform.rounds=[1, 1, 0]"])
    assert mapped.to_json() == strings.to_json()
    with pytest.raises(fedmml.ConfigError, match="unknown config key"):
        fedmml.load_config("tiny", {"federation.num_client": 3})


def test_every_callback_sees_every_event_and_the_command_writes_the_same_run(
    emoji_root: Path, tmp_path: Path
) -> None:
    overrides = [f'data.root="{emoji_root}"', "schedules.uniform.rounds=[1, 1, 0]", "run.threads=1"]
    first, second = [], []
    summary = fedmml.run(
        fedmml.load_config("tiny", overrides), tmp_path / "api", callbacks=[first.append, second.append]
    )
    assert first == second
    kinds = [type(e).__name__ for e in first]
    assert kinds.count("StageStarted") == 3 and kinds.count("RoundDone") == summary["rounds"] == 2
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "cli")]
    assert main([*args, *(x for o in overrides for x in ("--set", o))]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["rsum"] == summary["rsum"]


def test_the_public_names_are_the_documented_ones() -> None:
    assert {"load_config", "run", "resume", "compare", "evaluate", "RoundDone"} <= set(fedmml.__all__)
    assert all(getattr(fedmml, name) is not None for name in fedmml.__all__)
    with pytest.raises(AttributeError):
        fedmml.not_a_name  # noqa: B018
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
