"""Client-level differential privacy: clipping, the noise, the accountant, and runs that keep the guarantee.

Flower's own DP helpers (flwr.supercore.differential_privacy, the arithmetic of its DifferentialPrivacy*
strategies and clipping mods) are the reference for the clip and the noise parameters, as Flower's
aggregation functions are for fedavg.
"""

import json
import logging
import math
import shutil
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmml.config import ConfigError, load_config
from fedmml.experiment import build_setup
from fedmml.federation import SetupFailed, privacy
from fedmml.federation.privacy import Accountant, Privacy, PrivateSum, Sampling, clip_update
from fedmml.runs import read_metrics

dp = pytest.importorskip("flwr.supercore.differential_privacy")

TIMES = {"wall_s", "eval_s", "client_s", "client_train_s", "client_data_wait_s"}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g) * scale,
        "a.bias": torch.randn(8, generator=g) * scale,
        "steps": torch.tensor(3),
    }


def test_an_update_above_the_bound_is_clipped_as_flower_clips_it() -> None:
    reference, update = _tensors(0), _tensors(1, scale=5.0)
    clipped, within = clip_update(update, reference, 1.0)
    change = {k: clipped[k] - reference[k] for k in ("a.weight", "a.bias")}
    assert not within and privacy.l2_norm(change) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(clipped["steps"], update["steps"])  # integers are not part of the change
    # Flower's compute_clip_model_update on the same arrays.
    mine = [update[k].numpy().astype(np.float64) for k in ("a.weight", "a.bias")]
    dp.compute_clip_model_update(
        mine, [reference[k].numpy().astype(np.float64) for k in ("a.weight", "a.bias")], 1.0
    )
    for ours, theirs in zip((clipped["a.weight"], clipped["a.bias"]), mine, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-6)
    # Within the bound, or no change at all (Flower divides by the zero norm), nothing moves.
    small = {k: reference[k] + 1e-3 if k != "steps" else reference[k] for k in reference}
    assert all(torch.equal(clip_update(small, reference, 1.0)[0][k], small[k]) for k in small)
    assert clip_update(reference, reference, 1.0)[1]


def test_batchnorm_statistics_are_clipped_apart_within_their_share_of_the_bound() -> None:
    count = "bn.num_batches_tracked"
    reference = {"w": torch.zeros(9), "bn.running_var": torch.ones(16), count: torch.tensor(3)}
    update = {"w": torch.ones(9), "bn.running_var": torch.full((16,), 11.0), count: torch.tensor(6)}
    # The weights moved by 3, the statistics by 40: one bound of 4 over both keeps 4 / 40.1 of the weights'.
    joint, within = clip_update(update, reference, 4.0)
    assert not within and privacy.l2_norm({"w": joint["w"]}) == pytest.approx(3 * 4 / math.hypot(3, 40))
    split, within = clip_update(update, reference, 4.0, stats_share=0.1)
    # The weights are within sqrt(0.99) x 4 = 3.98: untouched, and "within" (what adaptive clipping counts).
    assert within and torch.equal(split["w"], update["w"])
    assert privacy.l2_norm({"s": split["bn.running_var"] - 1}) == pytest.approx(0.4)
    change = {k: split[k] - reference[k] for k in ("w", "bn.running_var")}
    assert privacy.l2_norm(change) <= 4.0  # the whole change within the bound: the noise is as before
    assert torch.equal(split[count], update[count])
    assert not clip_update({**update, "w": torch.full((9,), 2.0)}, reference, 4.0, stats_share=0.1)[1]
    kept, _ = clip_update(update, reference, 4.0, stats_share=0.0)
    assert torch.equal(kept["bn.running_var"], reference["bn.running_var"])
    # The server clips what arrives the same way, whatever the client did.
    acc = PrivateSum(4.0, 0.1)
    acc.add(update, reference, True, 1)
    assert acc.unclipped == 1 and torch.allclose(acc.sums["w"], torch.ones(9, dtype=torch.float64))
    assert float(acc.sums["bn.running_var"].norm()) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="stats_share"):
        load_config("tiny", ["privacy.target_epsilon=4", "privacy.stats_share=1.5"])


def _privacy(overrides: list[str], population: int = 100, rounds: int = 10) -> Privacy:
    cfg = load_config("tiny", [f"federation.num_clients={population}", *overrides])
    p = Privacy(cfg)
    p.bind(population, rounds)
    return p


def test_the_noise_has_the_configured_standard_deviation() -> None:
    p = _privacy(["privacy.noise_multiplier=1.3", "privacy.clip=0.5", "federation.clients_per_round=10"])
    reference = {"w": torch.zeros(400, 500), "b": torch.zeros(7)}
    acc = PrivateSum(p.bound)
    new, record = p.finish(acc, reference, {"w": 100, "b": 100}, seed=1)
    # Expected contributions: the sampling rate (10 of 100) x the 100 clients that train "w".
    want = dp.compute_stdv(1.3, 0.5, 10)
    assert record["noise_std"] == pytest.approx(1.3 * 0.5)
    noise = new["w"].double().flatten()
    assert noise.std().item() == pytest.approx(want, rel=0.01) and abs(noise.mean().item()) < 3 * want / 400
    # A tensor only some clients train is divided by its own expected contributions (here 3 x fewer).
    new, _ = p.finish(PrivateSum(p.bound), reference, {"w": 30, "b": 100}, seed=2)
    assert new["w"].double().std().item() == pytest.approx(want * 100 / 30, rel=0.01)
    # Seeded noise is the same for the same seed (a resumed run), system noise is not.
    again, _ = p.finish(PrivateSum(p.bound), reference, {"w": 30, "b": 100}, seed=2)
    assert torch.equal(again["w"], new["w"])
    system = _privacy(["privacy.noise_multiplier=1.3", 'privacy.noise_source="system"'])
    first, _ = system.finish(PrivateSum(1.0), reference, {"w": 1, "b": 1}, seed=2)
    second, _ = system.finish(PrivateSum(1.0), reference, {"w": 1, "b": 1}, seed=2)
    assert not torch.equal(first["w"], second["w"])


def test_a_noised_batchnorm_variance_stays_a_variance() -> None:
    # Noise of 0.65 per coordinate on variances of 0.1: about 44 % would fall below zero and BatchNorm's
    # output (and every later update) would be NaN; the floor is post-processing of the released value.
    p = _privacy(["privacy.noise_multiplier=1.3", "privacy.clip=0.5", "federation.clients_per_round=100"])
    reference = {"bn.running_var": torch.full((1000,), 0.1), "bn.running_mean": torch.zeros(1000)}
    new, _ = p.finish(PrivateSum(p.bound), reference, dict.fromkeys(reference, 1), seed=3)
    assert new["bn.running_var"].min() == 0 and (new["bn.running_var"] == 0).float().mean() > 0.3
    assert new["bn.running_mean"].min() < 0  # other tensors are released as noised


def test_no_unclipped_update_reaches_the_aggregate() -> None:
    p = _privacy(["privacy.noise_multiplier=1e-9", "privacy.clip=0.1"], population=4)
    reference = _tensors(0)
    acc = p.start()
    for seed in range(4):  # four clients whose changes are far above the bound, one saying otherwise
        acc.add(_tensors(seed + 1, scale=100.0), reference, unclipped=seed == 0, samples=10 * (seed + 1))
    new, record = p.finish(acc, reference, dict.fromkeys(reference, 4), seed=0)
    moved = privacy.l2_norm({k: new[k].double() - reference[k].double() for k in ("a.weight", "a.bias")})
    assert moved <= 0.1 * (1 + 1e-6)  # the mean of four changes of norm 0.1 at most
    assert acc.unclipped == 0  # the server counts what arrived, not what a client says
    assert record["epsilon"] > 1000  # next to no noise is next to no privacy


def test_epsilon_is_the_librarys_for_the_sampling_used() -> None:
    q, sigma, rounds, delta = 0.01, 1.1, 1000, 1e-5
    p = _privacy(["privacy.noise_multiplier=1.1", "federation.clients_per_round=10"], population=1000)
    expected = dp_accounting.rdp.RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    assert p.epsilon(rounds) == pytest.approx(expected.get_epsilon(delta), rel=1e-9)
    # The PLD accountant is tighter than RDP's bound, and close to it.
    pld = _privacy(
        ["privacy.noise_multiplier=1.1", "federation.clients_per_round=10", 'privacy.accountant="pld"'],
        population=1000,
    )
    assert 0.7 * p.epsilon(rounds) < pld.epsilon(rounds) <= p.epsilon(rounds)
    # Fixed-size sampling is accounted under replace-one, where a client moves the sum by twice the bound.
    fixed = Accountant(p.p, Sampling("fixed", 1000, 10))
    wor = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(sigma / 2)
    wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(1000, 10, gaussian), rounds)
    assert fixed.epsilon(sigma, rounds) == pytest.approx(wor.get_epsilon(delta), rel=1e-9)
    # target_epsilon solves the noise for the planned rounds: the run ends at the target, not above it.
    solved = _privacy(
        ["privacy.target_epsilon=4", "federation.clients_per_round=10"], population=1000, rounds=50
    )
    assert 3.99 < solved.epsilon(50) <= 4 and solved.epsilon(49) < solved.epsilon(50)


def test_solving_for_the_noise_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """The search tries multipliers where RDP's series fails to converge for some orders (q = 0.1, 12
    rounds); dp_accounting warns for each, and fedmml keeps that search's noise out of the run's output."""
    accountant = Accountant(
        _privacy(["privacy.target_epsilon=8"], population=1000).p, Sampling("poisson", 1000, 100)
    )
    before = logging.getLogger("absl").level
    with caplog.at_level(logging.WARNING):
        sigma = accountant.solve(8, 12)
    assert 7.99 < accountant.epsilon(sigma, 12) <= 8
    assert not [r for r in caplog.records if r.name == "absl"]
    assert logging.getLogger("absl").level == before


def test_adaptive_clipping_follows_the_quantile_and_noises_as_flower_does() -> None:
    overrides = ['privacy.clipping="adaptive"', "privacy.noise_multiplier=1.0", "privacy.count_stddev=5"]
    p = _privacy([*overrides, "privacy.clip=1.0"], population=100)
    assert p.update_noise == pytest.approx(dp.compute_adaptive_noise_params(1.0, 100, 5.0)[1])
    reference = {"w": torch.zeros(10)}
    bounds = []
    for unclipped in (False, True):  # every update clipped: the bound grows; none clipped: it shrinks
        acc = p.start()
        for _ in range(100):
            acc.add({"w": torch.full((10,), 0.01 if unclipped else 5.0)}, reference, unclipped, 1)
        p.finish(acc, reference, {"w": 100}, seed=3)
        bounds.append(p.bound)
    assert bounds[0] > 1.0 and bounds[1] < bounds[0]
    # The next round's noise follows the bound the round clipped with.
    acc = p.start()
    _, record = p.finish(acc, reference, {"w": 100}, seed=4)
    assert record["clip"] == bounds[1] and record["noise_std"] == pytest.approx(p.update_noise * bounds[1])
    with pytest.raises(ConfigError, match="count_stddev"):
        _ = _privacy([*overrides[:2], "privacy.noise_multiplier=20"], population=100).update_noise


def test_a_bound_left_far_from_the_updates_is_said_and_one_that_reached_them_is_not() -> None:
    from fedmml.report import _privacy_section

    overrides = ['privacy.clipping="adaptive"', "privacy.noise_multiplier=1.0", "privacy.clip=0.1"]
    reference = {"w": torch.zeros(10)}
    said, described = [], []
    for within in (0, 50, 100):  # of 100 updates of norm 16 or 0.03
        p = _privacy(overrides, population=100)
        for round_no in range(3):
            acc = p.start()
            for i in range(100):
                acc.add({"w": torch.full((10,), 0.01 if i < within else 5.0)}, reference, i < within, 1)
            p.finish(acc, reference, {"w": 100}, seed=round_no)
            assert p.clip_advice() == "" or round_no == 2  # not before three rounds
        said.append(p.clip_advice())
        described.append(p.describe())
        resumed = _privacy(overrides, population=100)
        resumed.load_state_dict(p.state_dict())
        assert resumed.clip_advice() == said[-1]
    assert "still clipped nearly every update" in said[0] and said[1] == ""
    assert "stayed above nearly every update" in said[2] and "larger than the updates needed" in said[2]
    assert all("start privacy.clip nearer the updates' norms" in said[i] for i in (0, 2))
    assert described[0]["clip_advice"] == said[0] and "clip_advice" not in described[1]
    assert said[0] in _privacy_section({"privacy": described[0]})[0]  # report.md says it too


@pytest.mark.parametrize(
    "override, message",
    [
        ('federation.aggregator="median"', "noise is for a sum"),
        ("federation.backfill=1", "sampling"),
        ('run.method="centralized"', "centralized"),
        ('model.neck_init="fit"', "neck_init"),
        ("privacy.clip=0", "privacy.clip must be > 0"),
        ("privacy.noise_multiplier=1", "not both"),
        ('privacy.accountant="pld"', "Poisson"),
    ],
)
def test_combinations_that_break_the_guarantee_are_refused(override: str, message: str) -> None:
    base = ["privacy.target_epsilon=4"]
    if "pld" in override:
        base.append('privacy.sampling="fixed"')
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*base, override])


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(out)]
    for item in (f'data.root="{root}"', "run.threads=1", "run.keep_checkpoints=0", *extra):
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_a_private_run_reports_epsilon_and_a_resumed_one_the_same(emoji_root: Path, tmp_path: Path) -> None:
    from fedmml.cli import main

    whole = tmp_path / "whole"
    extra = ["privacy.target_epsilon=4", "federation.num_clients=6", "federation.clients_per_round=3"]
    assert main(_args(emoji_root, whole, *extra, "schedules.uniform.rounds=[1, 2, 1]")) == 0
    metrics = read_metrics(whole)
    spent = [m["privacy"]["epsilon"] for m in metrics if not m.get("skipped")]
    assert spent == sorted(spent) and 3.9 < spent[-1] <= 4
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == spent[-1] and summary["privacy"]["sampling_rate"] == 0.5
    assert "## Privacy" in (whole / "report.md").read_text()
    # Stopped after round 2 and resumed: the same noise, the same model, the same epsilon.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    (stopped / "summary.json").unlink()
    for late in (3, 4):
        (stopped / "checkpoints" / f"round-{late:06d}.safetensors").unlink()
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0
    strip = [{k: v for k, v in m.items() if k not in TIMES} for m in read_metrics(stopped)]
    assert strip == [{k: v for k, v in m.items() if k not in TIMES} for m in metrics]
    assert json.loads((stopped / "summary.json").read_text())["privacy"] == summary["privacy"]
    a, b = load_file(stopped / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_the_server_clips_a_client_that_does_not(
    emoji_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clients skip their own clipping: the server's bound alone keeps each round's move within it.
    monkeypatch.setattr(
        "fedmml.federation.client.clip_update", lambda update, reference, bound, share: (update, True)
    )
    bound = 1e-3
    cfg = load_config(
        "tiny",
        [
            f'data.root="{emoji_root}"',
            "run.threads=1",
            'run.method="e2e"',
            "run.keep_checkpoints=0",
            f"privacy.clip={bound}",
            "privacy.noise_multiplier=1e-9",
            "eval.every=0",
        ],
    )
    build_setup(cfg, checkpoint_dir=tmp_path).run_rounds()
    rounds = sorted(tmp_path.glob("round-*.safetensors"))
    models = [load_file(path) for path in rounds]
    for before, after in zip(models, models[1:], strict=False):
        # Integer buffers (BatchNorm's batch counts) are averaged as without privacy, outside the bound.
        floats = [k for k, v in before.items() if v.is_floating_point()]
        moved = privacy.l2_norm({k: after[k].double() - before[k].double() for k in floats})
        assert 0 < moved <= bound * (1 + 1e-5)


def test_a_cap_the_first_round_passes_is_refused_before_training(emoji_root: Path) -> None:
    cfg = load_config(
        "tiny", [f'data.root="{emoji_root}"', "privacy.noise_multiplier=4", "privacy.max_epsilon=1"]
    )
    with pytest.raises(SetupFailed, match="max_epsilon = 1 is spent"):
        build_setup(cfg).run_rounds()


@pytest.mark.slow
def test_a_run_stops_before_the_round_that_would_pass_max_epsilon(emoji_root: Path, tmp_path: Path) -> None:
    from fedmml.cli import main

    # Three clients, all in every round, sigma 4: epsilon 1.01, 1.48 and 1.85 after rounds 1-3.
    assert (
        main(_args(emoji_root, tmp_path / "run", "privacy.noise_multiplier=4", "privacy.max_epsilon=1.6"))
        == 0
    )
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and all(m["privacy"]["epsilon"] <= 1.6 for m in metrics)
    assert "rsum" in metrics[-1]  # the last affordable round is evaluated
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "stopped before round 3" in summary["stopped_early"] and summary["rounds"] == 2
    assert math.isclose(summary["privacy"]["epsilon"], metrics[-1]["privacy"]["epsilon"])


def test_privacy_settings_name_the_runs_and_fill_the_comparison_and_grid_tables(tmp_path: Path) -> None:
    from fedmml.cli import _build_parser, _series_out
    from fedmml.comparison import combine
    from fedmml.report import write_comparison, write_grid

    eps = load_config("tiny", ["privacy.target_epsilon=8"])
    sigma = load_config("tiny", ["privacy.noise_multiplier=1.1", 'privacy.clipping="adaptive"'])
    secure = ['run.engine="flower-sim"', "privacy.secure_aggregation=true"]
    labels = [
        load_config("tiny", o).privacy.label for o in (secure, [*secure, "privacy.target_epsilon=8"], [])
    ]
    assert [eps.privacy.label, sigma.privacy.label, *labels] == [
        "dp-eps8",
        "dp-sigma1.1-adaptive",
        "secagg",
        "dp-eps8-secagg",
        "",
    ]
    args = _build_parser().parse_args(["compare", "--set", "privacy.target_epsilon=8"])
    assert _series_out(args, "compare", "emoji", eps).name.startswith("compare-emoji-dp-eps8-")

    def summary(rsum: float, epsilon: float | None) -> dict:
        out = {"rsum": rsum, "client_peak_mem_bytes": 2**20, "bytes_up_total": 10, "wall_s": 1.0}
        if epsilon is not None:
            out["privacy"] = {
                "epsilon": epsilon, "delta": 1e-5, "noise_multiplier": 0.7, "accountant": "rdp",
                "clipping": "fixed", "clip": 1.0, "sampling": "poisson", "sampling_rate": 0.1,
                "population": 100,
            }  # fmt: skip
        return out

    combined = combine({"e2e": {0: summary(40.0, 7.99)}, "lw": {0: summary(60.0, 7.98)}}, ("rsum",))
    text = write_comparison(tmp_path, combined, {"e2e": [], "lw": []}, "emoji").read_text()
    assert "Client-level DP (central): ε at δ = 1e-05 (RDP accountant)" in text
    assert "poisson sampling of rate 0.1 from 100 clients" in text
    assert "| method | ε (noise multiplier) |" in text and "| lw | 7.98 (σ 0.7) | 60.00 |" in text
    point = {"method": "lw", "schedule": "uniform", "encoder_scale": 1, "head_scale": 1, "run": "lw-a"}
    point |= {"val_rsum": 50.0, "client_peak_mem_bytes": 1, "client_flops_total": 1, "bytes_up_total": 1}
    result = {"score": "val_rsum", "proxy": [], "points": [{**point, "wall_s": 1.0, "epsilon": 3.5}]}
    result["best"] = {"lw": result["points"][0]}
    grid = write_grid(tmp_path, result).read_text()
    assert "| ε |" in grid and "| 3.5 |" in grid


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [("hetero", ["federation.client_memory_mib=[0, 11.6, 1.0]"]), ("lora", [])],
)
def test_a_client_clips_the_slice_it_sends(
    method: str, extra: list[str], emoji_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hetero clients train slices of different depths, LoRA clients their adapters and heads: each clips
    # exactly what it sends, and the change it sends is within the bound.
    clipped: list[tuple[frozenset[str], float, float, float]] = []
    clip = privacy.clip_update

    def recording(update, reference, bound, stats_share):
        out, within = clip(update, reference, bound, stats_share)
        floats = [k for k, v in update.items() if v.is_floating_point()]
        before = privacy.l2_norm({k: update[k].double() - reference[k].double() for k in floats})
        after = privacy.l2_norm({k: out[k].double() - reference[k].double() for k in floats})
        # The clipped weights are float32: each lands within half an ulp of reference + clipped change.
        rounding = privacy.l2_norm({k: (reference[k].double().abs() + bound) * 2**-24 for k in floats})
        clipped.append((frozenset(update), before, after, rounding))
        return out, within

    monkeypatch.setattr("fedmml.federation.client.clip_update", recording)
    bound = 1e-3
    overrides = [
        f'data.root="{emoji_root}"',
        "run.threads=1",
        f'run.method="{method}"',
        f"privacy.clip={bound}",
        "privacy.noise_multiplier=0.5",
        "eval.every=0",
        "schedules.uniform.rounds=[1, 1, 0]",
        *extra,
    ]
    records = build_setup(load_config("tiny", overrides), checkpoint_dir=tmp_path).run_rounds()
    assert len(clipped) >= 6  # three clients in each of two rounds (and hetero's measured slices)
    assert all(before > bound and after <= bound + rounding for _, before, after, rounding in clipped)
    slices = {keys for keys, *_ in clipped}
    if method == "hetero":
        assert len(slices) >= 2  # a deep slice and the heads, each clipped whole
    else:
        assert all(any("lora_" in k for k in keys) for keys in slices)
        # Of the encoder blocks only the adapters train, travel and are clipped, never the frozen weights.
        assert all(".lora_" in k for keys in slices for k in keys if ".blocks." in k)
    spent = [record["privacy"]["epsilon"] for record in records]
    assert len(spent) == 2 and 0 < spent[0] < spent[1]
