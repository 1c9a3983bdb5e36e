"""Incomplete data (data.missing_rate, data.unimodal_clients): seeded draws, encoders that never see an absent
modality's rows, the classifier's learned missing embedding, the dual encoder's unimodal terms, unimodal
clients' uploads, the robustness score, and using incomplete samples against dropping them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmml.config import ConfigError, load_config
from fedmml.data import missing
from fedmml.experiment import build_setup, run_experiment
from fedmml.federation.client import Client
from fedmml.federation.payload import unpack
from fedmml.federation.training import batch_presence
from fedmml.models.build import build_model
from fedmml.models.multimodal import PRESENT
from fedmml.runs import read_metrics


def _cfg(root: Path | None, *extra: str):
    first = [f'data.root="{root}"'] if root is not None else []
    return load_config("tiny-av", [*first, "run.threads=1", 'run.method="e2e"', "eval.every=0", *extra])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.missing_rate.audio=1.0"], r"data.missing_rate.audio must be in \[0, 1\)"),
        (["data.missing_rate.audio=-0.1"], r"must be in \[0, 1\)"),
        (["data.missing_rate.image=0.6", "data.missing_rate.audio=0.5"], "adds up to 1.1, more than 1"),
        (["data.unimodal_clients.image=0.7", "data.unimodal_clients.audio=0.4"], "adds up to 1.1"),
        (["data.missing_rate.text=0.2"], "not a modality of task 'image-audio'"),
        (['data.incomplete="skip"'], "unknown data.incomplete 'skip'"),
    ],
)
def test_bad_rates_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(None, *overrides)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.unimodal_weight must be >= 0"):
        load_config("tiny", ["data.missing_rate.text=0.3", "model.unimodal_weight=-1"])


def test_draws_are_seeded_disjoint_and_depend_only_on_seed_client_and_position() -> None:
    cfg = _cfg(None, "data.missing_rate.image=0.2", "data.missing_rate.audio=0.3")
    first = missing.presence(cfg, 4, 100)
    again = missing.presence(cfg, 4, 100)
    assert all(np.array_equal(first[m], again[m]) for m in first)
    assert (~first["image"]).sum() == 20 and (~first["audio"]).sum() == 30
    assert (first["image"] | first["audio"]).all()  # no sample loses both
    other = missing.presence(
        _cfg(None, "data.missing_rate.image=0.2", "data.missing_rate.audio=0.3", "run.seed=1"), 4, 100
    )
    assert not np.array_equal(first["audio"], other["audio"])
    assert not np.array_equal(first["audio"], missing.presence(cfg, 5, 100)["audio"])
    roles = missing.unimodal_roles(
        _cfg(
            None,
            "federation.num_clients=10",
            "data.unimodal_clients.image=0.2",
            "data.unimodal_clients.audio=0.2",
        )
    )
    assert sorted(roles.values()) == ["audio", "audio", "image", "image"]
    assert missing.presence(_cfg(None), 0, 10) is None  # complete data: nothing drawn


def test_a_lone_present_row_counts_as_absent() -> None:
    present = {"image": np.array([True, True, False]), "audio": np.array([False, True, False])}
    masks = batch_presence(present, [0, 1, 2])
    assert masks["image"].tolist() == [True, True, False] and not masks["audio"].any()


def test_absent_rows_reach_neither_encoder_statistics_nor_fusion(tuxpaint_root: Path) -> None:
    cfg = _cfg(tuxpaint_root, "model.num_classes=4", "data.missing_rate.audio=0.3")
    torch.manual_seed(0)
    model = build_model(cfg.model, load_weights=False, missing=True)
    for encoder in model.encoders.values():
        encoder.grow_to(encoder.total_blocks)
    model.train()  # batch statistics: absent rows would shift every present row's output
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(6, 3, 32, 32, generator=g),
        "audio": torch.randn(6, 64, 128, generator=g),
        "labels": torch.tensor([0, 1, 2, 3, 0, 1]),
        PRESENT: {"image": torch.ones(6, dtype=torch.bool), "audio": torch.tensor([1, 1, 0, 1, 0, 1]).bool()},
    }
    seen = []
    model.encoders["audio"].register_forward_pre_hook(
        lambda _, args: seen.append(len(next(iter(args[0].values()))))
    )
    torch.manual_seed(1)
    logits = model.logits(batch)
    assert seen == [4]  # the audio encoder ran on the four rows that hold audio
    noisy = {**batch, "audio": batch["audio"].clone()}
    noisy["audio"][[2, 4]] = 1e3  # whatever an absent row holds must not matter
    torch.manual_seed(1)
    torch.testing.assert_close(model.logits(noisy), logits)
    # An absent modality's projection is the learned embedding, and it learns.
    model.loss(batch).backward()
    assert model.missing["audio"].grad is not None and model.missing["audio"].grad.abs().sum() > 0
    assert model.missing["image"].grad is None or model.missing["image"].grad.abs().sum() == 0


def test_a_caption_less_image_trains_its_tower_through_two_views_only() -> None:
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, load_weights=False)
    for encoder in model.encoders.values():
        encoder.grow_to(encoder.total_blocks)
    model.eval()  # fixed statistics and no dropout: the terms can be compared exactly
    g = torch.Generator().manual_seed(0)
    texts = ["a red circle", "a blue cat", "two dogs", "a green car", "a tree", "the sea"]
    batch = {"image": torch.randn(6, 3, 32, 32, generator=g), "text": texts, "index": list(range(6))}
    pairs = {"image": batch["image"][:4], "text": texts[:4], "index": list(range(4))}
    incomplete = {
        **batch,
        PRESENT: {"image": torch.ones(6).bool(), "text": torch.tensor([1, 1, 1, 1, 0, 0]).bool()},
    }
    model.unimodal_weight = 0.0
    torch.testing.assert_close(model.loss(incomplete), model.loss(pairs))  # the caption-less rows add nothing
    model.unimodal_weight = 1.0
    torch.manual_seed(1)
    with_views = model.loss(incomplete)
    changed = {**incomplete, "image": incomplete["image"].clone()}
    changed["image"][4:] += 1.0
    torch.manual_seed(1)
    assert not torch.allclose(model.loss(changed), with_views)  # now they train the image tower
    changed_pairs = {**incomplete, "text": [*texts[:4], "x", "y"]}
    torch.manual_seed(1)
    torch.testing.assert_close(model.loss(changed_pairs), with_views)  # an absent caption is never read


@pytest.mark.slow
@pytest.mark.parametrize("task", ["image-audio", "image-text"])
def test_lw_cache_stays_exact_with_missing_rows(
    task: str, tuxpaint_root: Path, emoji_root: Path, same_trajectory
) -> None:
    losses = {}
    for cached in ("true", "false"):
        if task == "image-audio":
            cfg = _cfg(tuxpaint_root, "data.missing_rate.audio=0.3")
        else:  # the unimodal terms run the whole encoder for their second view, cached or not
            rates = ["data.missing_rate.text=0.3", "data.missing_rate.image=0.2"]
            cfg = load_config("tiny", [f'data.root="{emoji_root}"', "run.threads=1", "eval.every=0", *rates])
        cfg.run.method, cfg.cache.frozen_prefix = "lw", cached == "true"
        cfg.active_schedule.rounds = [1, 1, 0]  # the cache serves from the second stage on
        setup = build_setup(cfg)
        losses[cached] = [m["train_loss"] for m in setup.run_rounds()]
    steps = max(c.num_samples for c in setup.clients.values()) // cfg.federation.batch_size
    same_trajectory(losses["true"], losses["false"], steps)


@pytest.mark.slow
def test_unimodal_clients_upload_only_their_tower_and_runs_report_incomplete_data(
    tuxpaint_root: Path, tmp_path: Path, monkeypatch
) -> None:
    uploads: dict[int, set[str]] = {}
    downloads: dict[int, set[str]] = {}
    handle = Client.handle

    def spy(self, message):
        if not message.meta.get("evaluate"):
            downloads.setdefault(self.cid, set()).update(unpack(message.blob))
        reply = handle(self, message)
        uploads.setdefault(self.cid, set()).update(unpack(reply.blob))
        return reply

    monkeypatch.setattr(Client, "handle", spy)
    unimodal = ["data.unimodal_clients.image=0.34", "data.unimodal_clients.audio=0.34"]
    summary = run_experiment(_cfg(tuxpaint_root, *unimodal), tmp_path / "use")
    roles = missing.unimodal_roles(_cfg(tuxpaint_root, *unimodal))
    assert sorted(roles.values()) == ["audio", "image"]
    for cid, role in roles.items():
        other = "audio" if role == "image" else "image"
        for sent in (uploads[cid], downloads[cid]):  # the other tower neither trains nor travels
            assert not any(k.startswith((f"encoders.{other}.", f"heads.{other}.")) for k in sent)
        assert any(k.startswith(f"encoders.{role}.") for k in uploads[cid])
        assert f"missing.{other}" in uploads[cid]  # it trains the fusion with the stand-in
    complete = next(c for c in range(3) if c not in roles)
    assert any(k.startswith("encoders.audio.") for k in uploads[complete])
    assert any(k.startswith("encoders.image.") for k in downloads[complete])
    samples = summary["client_samples"]
    assert summary["incomplete_samples"] == {
        "image": samples[str(next(c for c, r in roles.items() if r == "audio"))],
        "audio": samples[str(next(c for c, r in roles.items() if r == "image"))],
    }
    assert set(summary["missing_test"]) == {"image_missing_1", "audio_missing_1"}
    # Dropping incomplete samples leaves the unimodal clients nothing: they sit out every round.
    dropped = run_experiment(_cfg(tuxpaint_root, *unimodal, 'data.incomplete="drop"'), tmp_path / "drop")
    assert dropped["train_images"] == samples[str(complete)]
    for record in read_metrics(tmp_path / "drop"):
        assert record["clients"] == [complete]
    assert 0 <= dropped["missing_test"]["audio_missing_1"]["accuracy"] <= 100


def test_a_unimodal_client_receives_the_other_tower_only_to_evaluate(tuxpaint_root: Path) -> None:
    cfg = _cfg(tuxpaint_root, "data.unimodal_clients.image=0.34", 'eval.where="federated"')
    setup = build_setup(cfg)
    server = setup.server
    server.open_clients(setup.engine)
    stage = server.stages[0]
    trainable = server.narrow(stage, server.enter_stage(stage))
    (cid,) = missing.unimodal_roles(cfg)
    train, _ = server.message_for(cid, stage, 1, trainable)
    scored, _ = server.message_for(cid, stage, 1, trainable, evaluate=True)
    assert not any(k.startswith(("encoders.audio.", "heads.audio.")) for k in unpack(train.blob))
    assert any(k.startswith(("encoders.audio.", "heads.audio.")) for k in unpack(scored.blob))
    # The client trains on what it was sent, and scores its complete held-out pairs with the server's towers.
    client = setup.clients[cid]
    assert client.handle(train).meta["cid"] == cid
    assert "scores" in client.evaluate(scored).meta
    held, want = client.workspace.model.state_dict(), server.model.state_dict()
    assert all(torch.equal(held[k], want[k]) for k in want if k.startswith("encoders.audio."))
