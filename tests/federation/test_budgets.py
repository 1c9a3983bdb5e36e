"""Memory budgets (federation.client_memory_mib) and run.method = "hetero": each client trains the deepest
slice its budget fits, measured, and the server averages each tensor over the clients that trained it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedmml.bench import slice_peaks
from fedmml.config import ConfigError, load_config
from fedmml.experiment import run_experiment
from fedmml.federation import SetupFailed
from fedmml.federation.aggregate import RunningMean, coordinate_median, trimmed_mean
from fedmml.federation.budgets import MIB, OUT, check_plans, client_budgets, plan_stage
from fedmml.federation.client import Client
from fedmml.federation.payload import unpack
from fedmml.methods import centralize
from fedmml.runs import read_metrics

MiB = float(MIB)


def _cfg(emoji_root, method: str, budgets: str, *extra: str):
    overrides = [
        f'data.root="{emoji_root}"',
        f'run.method="{method}"',
        f"federation.client_memory_mib={budgets}",
        "run.threads=1",
        "eval.every=0",
        *extra,
    ]
    return load_config("tiny", overrides)


def test_each_client_gets_the_deepest_slice_its_budget_fits() -> None:
    peaks = {"prog": 20 * MIB, "lw": 3 * MIB, "heads": MIB // 2}
    slices = ("prog", "lw", "heads")
    plan = plan_stage({0: 0.0, 1: 25.0, 2: 10.0, 3: 1.0, 4: 0.25}, peaks, slices)
    assert plan == {0: "prog", 1: "prog", 2: "lw", 3: "heads", 4: OUT}
    assert plan_stage({0: 10.0, 1: 30.0}, {"e2e": 20 * MIB}, ("e2e",)) == {0: OUT, 1: "e2e"}
    check_plans({0: plan}, {0: peaks}, min_clients=4)
    with pytest.raises(SetupFailed, match=r"stage 1: 4 of 5 clients .* the smallest, heads, needs 0.5 MiB"):
        check_plans({0: plan}, {0: peaks}, min_clients=5)


def test_centralized_is_one_machine_without_a_budget() -> None:
    cfg = load_config("tiny", ['run.method="centralized"', "federation.client_memory_mib=[0, 300, 300]"])
    assert centralize(cfg).federation.client_memory_mib == 0.0  # a per-client list would not fit one client


def test_a_nodes_declared_budget_wins_over_the_config() -> None:
    cfg = load_config("tiny", ["federation.client_memory_mib=[100, 0, 50]"])
    reports = {0: {}, 1: {"memory_mib": 30}, 2: {}}
    assert client_budgets(cfg, reports) == {0: 100.0, 1: 30.0, 2: 50.0}
    one = load_config("tiny", ["federation.client_memory_mib=64"])
    assert client_budgets(one, {0: {}, 1: {}}) == {0: 64.0, 1: 64.0}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[100, 200]", "lists 2 budgets for federation.num_clients = 3"),
        ("-5", "must be >= 0"),
        ("[1, -1, 2]", "must be >= 0"),
        ('"lots"', "must be numbers of MiB"),
    ],
)
def test_bad_budgets_are_one_line_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny", [f"federation.client_memory_mib={value}"])
    assert "\n" not in str(err.value)


def test_each_tensor_is_averaged_over_the_clients_that_trained_it() -> None:
    a = {"block": torch.tensor([1.0, 2.0]), "head": torch.tensor([4.0])}
    b = {"head": torch.tensor([8.0])}  # a heads-only client
    mean = RunningMean()
    mean.add(a, 100)
    mean.add(b, 300)
    result = mean.result()
    torch.testing.assert_close(result["block"], a["block"])  # only a trained it: its value, whole
    torch.testing.assert_close(result["head"], torch.tensor([7.0]))  # (100 x 4 + 300 x 8) / 400
    c = {"head": torch.tensor([100.0])}
    median = coordinate_median([(a, 1), (b, 1), (c, 1)])
    torch.testing.assert_close(median["block"], a["block"])
    torch.testing.assert_close(median["head"], torch.tensor([8.0]))
    torch.testing.assert_close(trimmed_mean([(a, 1), (b, 1), (c, 1)], 0.34)["head"], torch.tensor([8.0]))


@pytest.mark.slow
def test_hetero_plans_fit_the_measured_budgets_and_aggregate_per_tensor(
    emoji_root, tmp_path, monkeypatch
) -> None:
    peaks = slice_peaks(_cfg(emoji_root, "hetero", "0"))
    first, last = peaks[0], peaks[2]
    assert first["lw"] == first["prog"]  # in the first stage LW trains every block too
    assert last["heads"] < last["lw"] < last["prog"]
    between = (last["lw"] + last["prog"]) / 2 / MiB  # LW's slice fits, Prog's does not
    heads_only = max(p["heads"] for p in peaks.values()) * 1.05 / MiB
    uploads: dict[tuple[int, int], tuple[str, dict[str, torch.Tensor], int]] = {}
    handle = Client.handle

    def spy(self, message):
        reply = handle(self, message)
        meta = message.meta
        if not meta.get("evaluate"):
            uploads[meta["round"], self.cid] = (meta["method"], unpack(reply.blob), reply.meta["num_samples"])
        return reply

    monkeypatch.setattr(Client, "handle", spy)
    # The server would measure the same peaks again (budgets do not change them); the other tests cover that.
    monkeypatch.setattr("fedmml.setup.slice_peaks", lambda cfg: peaks)
    cfg = _cfg(emoji_root, "hetero", f"[0, {between}, {heads_only}]")
    summary = run_experiment(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    plans = [r["client_plans"] for r in metrics]
    assert plans == [
        {"0": "prog", "1": "heads", "2": "heads"},  # stage 1: LW's slice is Prog's, too big for client 1
        {"0": "prog", "1": "lw", "2": "heads"},
        {"0": "prog", "1": "lw", "2": "heads"},
    ]
    # Every client measured its own peak in each stage, and every one stayed within its budget.
    budgets = {0: 0.0, 1: between, 2: heads_only}
    for record in metrics:
        assert record["clients"] == [0, 1, 2]
        for cid, peak in record["client_peak_mem"].items():
            assert budgets[int(cid)] == 0 or peak <= budgets[int(cid)] * MiB
    assert summary["budgets"]["client_rounds_measured"] == 9
    assert summary["budgets"]["client_rounds_within_budget"] == 9
    assert summary["budgets"]["client_rounds"] == {"prog": 3, "heads": 4, "lw": 2}
    assert "client slices" in (tmp_path / "report.md").read_text()
    # Payloads hold exactly the planned slice: heads clients no encoder tensor (tiny has no necks), LW
    # clients only the stage's new blocks (+ norms), Prog clients every block.
    method_of = {"prog": "prog", "lw": "lw", "heads": "frozen"}
    for (round_no, cid), (method, tensors, _) in uploads.items():
        assert method == method_of[plans[round_no - 1][str(cid)]]
        blocks = {".".join(k.split(".")[1:4]) for k in tensors if ".blocks." in k}
        encoder = [k for k in tensors if k.startswith("encoders.")]
        if method == "frozen":
            assert encoder == []
        elif method == "lw":
            new = {f"image.blocks.{j}" for j in (2 * round_no - 2, 2 * round_no - 1)}
            assert blocks == new | {f"text.blocks.{round_no - 1}"}
        else:
            assert len(blocks) == 3 * round_no and "image.blocks.0" in blocks
    # Per tensor, the average is over the clients that trained it, weighted by their samples.
    final = load_file(tmp_path / "model.safetensors")
    only_prog = "encoders.image.blocks.0.attention.q_proj.weight"
    torch.testing.assert_close(final[only_prog], uploads[3, 0][1][only_prog])
    head = next(k for k in uploads[3, 2][1] if k.startswith("heads.") and k.endswith("weight"))
    weighted = sum(uploads[3, c][1][head].double() * uploads[3, c][2] for c in range(3))
    total = sum(uploads[3, c][2] for c in range(3))
    torch.testing.assert_close(final[head], (weighted / total).float())


@pytest.mark.slow
def test_other_methods_leave_out_clients_their_peak_exceeds_and_too_small_budgets_fail_first(
    emoji_root, tmp_path
) -> None:
    one_round = "schedules.uniform.rounds=[1, 0, 0]"
    peak = slice_peaks(_cfg(emoji_root, "e2e", "0", one_round))[0]["e2e"]
    cfg = _cfg(emoji_root, "e2e", f"[0, {peak * 2 / MiB}, {peak / 2 / MiB}]", one_round)
    summary = run_experiment(cfg, tmp_path / "e2e")
    for record in read_metrics(tmp_path / "e2e"):
        assert record["client_plans"] == {"0": "e2e", "1": "e2e", "2": OUT}
        assert record["clients"] == [0, 1]
    assert summary["budgets"]["client_stages_out"] == 1
    with pytest.raises(SetupFailed, match=r"stage 1: 0 of 3 clients fit .* the smallest, heads, needs"):
        run_experiment(_cfg(emoji_root, "hetero", "0.01"), tmp_path / "small")
    assert read_metrics(tmp_path / "small") == []


@pytest.mark.parametrize("value", ["[]", '["lw", "lw"]', '["deep"]'])
def test_bad_hetero_slices_are_one_line_errors(value: str) -> None:
    with pytest.raises(
        ConfigError, match="federation.hetero_slices must name each of prog, lw, heads"
    ) as err:
        load_config("tiny", [f"federation.hetero_slices={value}"])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_hetero_without_the_prog_slice_and_without_budgets_is_lw(emoji_root, tmp_path) -> None:
    two = "schedules.uniform.rounds=[1, 1, 0]"
    lw = run_experiment(_cfg(emoji_root, "lw", "0", two), tmp_path / "lw")
    only = 'federation.hetero_slices=["heads", "lw"]'
    hetero = run_experiment(_cfg(emoji_root, "hetero", "0", two, only), tmp_path / "hetero")
    assert [r["client_plans"] for r in read_metrics(tmp_path / "hetero")] == [
        {"0": "lw", "1": "lw", "2": "lw"}
    ] * 2
    for a, b in zip(read_metrics(tmp_path / "lw"), read_metrics(tmp_path / "hetero"), strict=True):
        assert (a["train_loss"], a["bytes_up"], a["bytes_down"]) == (
            b["train_loss"],
            b["bytes_up"],
            b["bytes_down"],
        )
    assert hetero["rsum"] == lw["rsum"]
