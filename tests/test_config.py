import dataclasses

import pytest

from bt_pipeline.config import (
    ClassifierConfig,
    DataConfig,
    UNetConfig,
    from_dict,
    load_json,
    save_json,
    to_dict,
)


@pytest.mark.parametrize("config", [DataConfig(), ClassifierConfig(filters=(8, 16)),
                                    UNetConfig(depth=3, batch_norm=False)])
def test_json_round_trip(config, tmp_path):
    save_json(config, tmp_path / "c.json", extra={"note": "ignored on load"})
    assert load_json(tmp_path / "c.json") == config
    assert from_dict(to_dict(config)) == config


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataConfig().seed = 3  # type: ignore[misc]


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown field"):
        from_dict({"type": "UNetConfig", "depht": 3})
