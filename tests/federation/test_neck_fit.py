"""model.neck_init = "fit": a neck rebuilt by a width-changing growth is fitted by federated least squares to
give what the previous neck gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmml.config import ConfigError, EncoderConfig, load_config
from fedmml.experiment import run_experiment
from fedmml.federation.neck_fit import NeckFit, enabled, solve, statistics
from fedmml.models.build import build_model


def _model():
    cfg = load_config("tiny")
    # EfficientNet-Lite0 (random weights) widens 16 -> 24 -> 40 over its first five blocks.
    cfg.model.image = EncoderConfig(backend="efficientnet_lite", neck_dim=16, image_size=32)
    model = build_model(cfg.model, load_weights=False)
    model.encoders["image"].grow_to(3)
    model.encoders["text"].grow_to(1)
    return model.eval()


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"index": list(range(8)), "image": torch.randn(8, 3, 32, 32, generator=g)} for _ in range(n)]


def _image_features(model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encoders["image"](model.inputs("image", b["image"])) for b in batches])


def test_clients_sums_add_up_to_one_machines_and_the_fit_is_least_squares() -> None:
    model = _model()
    batches = _batches(6)
    before = _image_features(model, batches)  # what the heads were trained on
    fit = NeckFit()
    fit.add(model, {"image": 5, "text": 2})  # BERT keeps its width: no neck to fit there
    assert fit.depths == {"image": 3}
    model.encoders["image"].grow_to(5)
    fresh = _image_features(model, batches)
    # Two clients' sums are the sums over their samples together: the federated fit is the pooled one.
    one, n1 = statistics(model, batches[:2], fit.depths, fit.previous, limit=1000)
    two, n2 = statistics(model, batches[2:], fit.depths, fit.previous, limit=1000)
    whole, n = statistics(model, batches, fit.depths, fit.previous, limit=1000)
    assert (n1, n2, n) == (16, 32, 48)
    for key in whole:
        torch.testing.assert_close(one[key] + two[key], whole[key])
    assert statistics(model, batches, fit.depths, fit.previous, limit=20)[1] == 20
    report = solve(model, whole, n)["image"]
    assert report["width"] == 40
    after = _image_features(model, batches)

    def r2(pred: torch.Tensor) -> float:
        residual = ((before - pred) ** 2).sum()
        return float(1 - residual / ((before - before.mean(0)) ** 2).sum())

    # The reported R^2 is that of the fitted neck's outputs on those samples; a fresh neck is far off.
    assert report["r2"] == pytest.approx(r2(after), abs=1e-3)
    assert r2(after) > 0.5 > r2(fresh)
    # Least squares: the residual is (up to the small ridge) orthogonal to every input feature.
    hidden = _pooled(model, batches)
    assert (hidden.T @ (before - after)).abs().max() < 1e-2 * (hidden.T @ before).abs().max()


def _pooled(model, batches: list[dict]) -> torch.Tensor:
    encoder = model.encoders["image"]
    with torch.no_grad():
        rows = []
        for b in batches:
            hidden, context = encoder.forward_prefix(model.inputs("image", b["image"]), encoder.depth)
            rows.append(encoder.norm(encoder.pool(hidden, context)))
    x = torch.cat(rows)
    return torch.cat([x, torch.ones(len(x), 1)], dim=1)


def test_a_growth_without_training_keeps_the_last_trained_neck_as_target() -> None:
    model = _model()
    fit = NeckFit()
    fit.add(model, {"image": 5, "text": 1})
    kept = {k: v.clone() for k, v in fit.previous.items()}
    model.encoders["image"].grow_to(5)
    fit.add(model, {"image": 8, "text": 1})  # a stage without rounds in between
    assert fit.depths == {"image": 3}
    assert all(torch.equal(kept[k], v) for k, v in fit.previous.items())


@pytest.mark.slow  # a short emoji run
def test_a_run_fits_the_rebuilt_neck_with_the_rounds_clients(emoji_root: Path, tmp_path: Path) -> None:
    overrides = [
        f'data.root="{emoji_root}"',
        'model.neck_init="fit"',
        "model.neck_fit_samples=16",
        "model.image.image_size=32",
        "data.limit_train=60",
        "data.limit_test=40",
        "federation.num_clients=3",
        "federation.clients_per_round=2",
        "federation.batch_size=16",  # 20 samples per client
        "eval.every=0",
        "run.threads=1",
        "schedules.uniform.rounds=[1, 1, 0, 0, 0, 0]",
    ]
    run_experiment(load_config("emoji", overrides), tmp_path)
    first, second = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert "neck_fit" not in first  # nothing trained before stage 1: nothing to preserve
    fitted = second["neck_fit"]
    assert fitted["clients"] == second["clients"] and fitted["samples"] == 16 * len(second["clients"])
    assert set(fitted["encoders"]) == {"image"} and fitted["encoders"]["image"]["width"] == 80
    assert fitted["encoders"]["image"]["r2"] > 0


def test_neck_init_is_checked() -> None:
    with pytest.raises(ConfigError, match="model.neck_init"):
        load_config("tiny", ['model.neck_init="random"'])
    with pytest.raises(ConfigError, match="neck_fit_samples"):
        load_config("tiny", ["model.neck_fit_samples=0"])


@pytest.mark.parametrize(
    ("method", "neck_init", "fits"),
    [
        ("prog", None, True),
        ("lw", None, False),
        ("e2e", None, False),
        ("lw", "fit", True),
        ("prog", "fresh", False),
    ],
)
def test_by_default_only_prog_fits_its_necks(method: str, neck_init: str | None, fits: bool) -> None:
    overrides = [f'run.method="{method}"'] + ([f'model.neck_init="{neck_init}"'] if neck_init else [])
    assert enabled(load_config("tiny", overrides)) is fits
