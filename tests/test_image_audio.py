"""The image + audio task end to end on real Tux Paint stamps and spoken descriptions (the tiny-av preset)."""

import json
from pathlib import Path

import pytest

from fedmml.cli import main
from fedmml.config import ConfigError, load_config
from fedmml.experiment import build_setup
from fedmml.tasks import resolve_classes, task_for

pytestmark = pytest.mark.slow  # training runs on real Tux Paint data; `make test-fast` skips it


def _cfg(root: Path, *extra: str):
    return load_config("tiny-av", [f'data.root="{root}"', "run.threads=1", *extra])


@pytest.mark.parametrize("method", ["e2e", "lw", "prog"])
def test_each_method_runs_and_reports(tuxpaint_root: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    args = ["run", "--preset", "tiny-av", "--method", method, "--quiet", "--out", str(out)]
    assert main([*args, "--set", f'data.root="{tuxpaint_root}"', "--set", "run.threads=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "image-audio" and summary["method"] == method
    assert 0 <= summary["accuracy"] <= 100 and 0 <= summary["macro_f1"] <= 100
    assert 0 < summary["majority_rate"] < 100 and len(summary["classes"]) == 4
    # The confusion matrix counts every test sample once.
    assert sum(map(sum, summary["confusion"])) == summary["test_images"]
    assert (out / "confusion.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "confusion.png" in report and "macro F1" in report
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("accuracy" in m and "macro_f1" in m for m in metrics)
    # The summary's confusion matrix is the last evaluation's, not a second pass over the test split.
    assert metrics[-1]["confusion"] == summary["confusion"]


def test_lw_cache_is_exact_on_audio(tuxpaint_root: Path, same_trajectory) -> None:
    losses, cache_bytes = {}, {}
    for cached in ("true", "false"):
        cfg = _cfg(tuxpaint_root, 'run.method="lw"', f"cache.frozen_prefix={cached}")
        setup = build_setup(cfg)
        metrics = setup.run_rounds()
        losses[cached] = [m["train_loss"] for m in metrics]
        cache_bytes[cached] = metrics[-1]["client_cache_bytes"]
    steps = max(c.num_samples for c in setup.clients.values()) // cfg.federation.batch_size
    same_trajectory(losses["true"], losses["false"], steps)
    assert cache_bytes["true"] > 0 == cache_bytes["false"]


def test_partitions_by_class_and_by_language(tuxpaint_root: Path) -> None:
    cfg = resolve_classes(_cfg(tuxpaint_root, 'partition.kind="group"', "federation.num_clients=4"))
    task = task_for(cfg)
    train = task.load_split(cfg, "train", train=True)
    parts = task.partitions(cfg, train)
    assert sorted(i for p in parts for i in p) == list(range(len(train)))
    # Each client holds whole languages: feature skew, no language shared between clients.
    languages = [{train.groups[i] for i in p} for p in parts]
    assert all(a.isdisjoint(b) for k, a in enumerate(languages) for b in languages[k + 1 :])
    assert parts == task.partitions(cfg, train)

    dirichlet = resolve_classes(_cfg(tuxpaint_root, 'partition.kind="dirichlet"', "partition.alpha=0.5"))
    first = task.partitions(dirichlet, train)
    assert first == task.partitions(dirichlet, train)  # seeded: reproducible
    assert sorted(i for p in first for i in p) == list(range(len(train)))
    other_seed = _cfg(tuxpaint_root, 'partition.kind="dirichlet"', "partition.alpha=0.5", "run.seed=1")
    assert task.partitions(resolve_classes(other_seed), train) != first


def test_classes_come_from_the_data(tuxpaint_root: Path, tmp_path: Path) -> None:
    assert resolve_classes(_cfg(tuxpaint_root)).model.num_classes == 4
    # The class names travel in the config, so every client labels alike; a head of another width is an error.
    named = resolve_classes(_cfg(tuxpaint_root, 'data.classes=["a", "b", "c"]'))
    assert named.data.classes == ["a", "b", "c"] and named.model.num_classes == 3
    with pytest.raises(ConfigError, match="model.num_classes = 7 but there are 4 classes"):
        resolve_classes(_cfg(tuxpaint_root, "model.num_classes=7"))
    (tmp_path / "train" / "vision" / "only").mkdir(parents=True)
    with pytest.raises(ConfigError, match="at least 2"):
        resolve_classes(_cfg(tmp_path))


def test_schedule_must_name_the_task_modalities() -> None:
    with pytest.raises(ConfigError, match="image, audio"):
        load_config("tiny-av", ['model.task="image-text"'])
    with pytest.raises(ConfigError, match="image, text"):
        load_config("tiny", ['model.task="image-audio"'])


def test_audio_backend_and_features_must_match() -> None:
    with pytest.raises(ConfigError, match="aisfx-mel"):
        load_config("tuxpaint-av-aisfx", ['data.audio_features="ast-fbank"'])
    with pytest.raises(ConfigError, match="ast-fbank"):
        load_config("tuxpaint-av", ['data.audio_features="aisfx-mel"'])


def test_federated_evaluation_sums_confusion_matrices_exactly(tuxpaint_root: Path) -> None:
    # The three clients' shares of the test split together are the whole split, so the summed confusion
    # matrices give exactly the whole-split accuracy and macro-F1 the server computes.
    runs = {}
    for where in ("server", "federated"):
        runs[where] = build_setup(_cfg(tuxpaint_root, f'eval.where="{where}"')).run_rounds()
    for server, fed in zip(runs["server"], runs["federated"], strict=True):
        assert fed["train_loss"] == server["train_loss"] and fed["bytes_up"] == server["bytes_up"]
        assert fed["eval_clients"] == [0, 1, 2] and fed["eval_bytes_down"] > 0
        assert (fed["evaluation"], server["evaluation"]) == ("federated", "server")
        assert fed["confusion"] == server["confusion"]
        assert fed["accuracy"] == server["accuracy"] and fed["macro_f1"] == server["macro_f1"]
        assert fed["test_loss"] == pytest.approx(server["test_loss"], rel=1e-5)
