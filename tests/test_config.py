"""Config: presets, overrides, validation messages."""

import pytest

from fedmml.config import ConfigError, available_presets, config_from_dict, load_config


def test_every_preset_loads() -> None:
    for name in available_presets():
        assert load_config(name).preset == name
    assert {"emoji", "tiny", "paper-coco"} <= set(available_presets())


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config("tiny", ["federation.num_clients=2", "schedule=late-heavy", "model.head.dropout=0"])
    assert cfg.federation.num_clients == 2
    assert cfg.schedule == "late-heavy" and cfg.active_schedule.rounds == [0, 1, 2]
    assert cfg.model.head.dropout == 0.0 and isinstance(cfg.model.head.dropout, float)


def test_paper_schedules_by_name() -> None:
    cfg = load_config("paper-coco")
    assert cfg.schedules["uniform"].rounds == [15] * 6
    assert cfg.schedules["late-heavy"].rounds == [0, 0, 0, 10, 30, 50]
    assert cfg.schedules["uniform"].blocks == {"image": [2] * 6, "text": [1] * 6}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.num_clientz=3", "valid keys under federation."),
        ("run.method=sgd", "valid choices: e2e, lw, prog"),
        ("schedule=fast", "valid schedules"),
        ('federation.batch_size="big"', "must be of type int"),
        ("schedules.uniform.rounds=[1, 1]", "entries"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_overrides_name_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid presets: .*emoji"):
        load_config("nope")


def test_round_trip_through_dict() -> None:
    cfg = load_config("paper-coco", ["schedule=late-heavy"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_the_tuned_sets_ship_and_load() -> None:
    from fedmml.config import tuned_folder, tuned_sets

    assert {"emoji", "tuxpaint"} <= set(tuned_sets())
    for name, task in (("emoji", "image-text"), ("tuxpaint", "image-audio")):
        folder = tuned_folder(name)
        for method in ("e2e", "lw", "prog", "frozen", "lora", "centralized"):
            cfg = load_config(str(folder / f"{method}.toml"))
            assert cfg.run.method == method and cfg.model.task == task
    lw = load_config(str(tuned_folder("emoji") / "lw.toml"))
    base = load_config("emoji")
    assert lw.schedule == "late-heavy"
    assert lw.active_schedule.lr["image"][0] == 4 * base.schedules["late-heavy"].lr["image"][0]
    assert load_config(str(tuned_folder("tuxpaint") / "e2e.toml")).data.limit_train == 1000
    with pytest.raises(ConfigError, match="nor a tuned set"):
        tuned_folder("nope")
