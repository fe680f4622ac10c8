"""Config loading, dotted overrides and the error messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raycontrast.config import (
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    known_keys,
    load_config,
    parse_overrides,
    to_yaml,
)
from raycontrast.space import initial_points, parse_space

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_follow_the_published_recipe() -> None:
    cfg = load_config()
    assert (cfg.loss.temperature, cfg.loss.base_temperature) == (0.1, 0.07)
    assert (cfg.loss.max_samples, cfg.loss.max_views, cfg.loss.weight) == (1024, 100, 0.1)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.poly_power) == (0.01, 0.9, 0.9)
    assert cfg.memory.size == 0 and cfg.memory.pixel_update_freq == 10
    assert cfg.model.proj_dim == 256 and cfg.train.iterations == 40_000


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    parse_space(cfg)
    again = Config.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_overrides_apply_by_dotted_key(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0], {"loss.temperature": 0.2, "data.crop_size": [64, 96]})
    assert cfg.loss.temperature == 0.2 and cfg.data.crop_size == (64, 96)
    assert flatten(cfg)["loss.temperature"] == 0.2
    # the CLI parses key=value with YAML scalars; Tune trials pass Python values: same result
    cli = load_config(CONFIGS[0], parse_overrides(["loss.temperature=0.2", "data.crop_size=[64, 96]"]))
    assert cli == cfg


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.loss.temperature = 1.0  # type: ignore[misc]


def test_flatten_covers_every_known_key() -> None:
    assert set(flatten(load_config())) == set(known_keys())


def test_yaml_is_read_with_safe_load(tmp_path: Path) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


BAD_OVERRIDES = [
    ({"loss.temprature": 0.2}, "loss.temprature", "did you mean 'loss.temperature'"),
    ({"loss.temperature": 0}, "loss.temperature", "greater than 0"),
    ({"loss.temperature": -0.5}, "loss.temperature", "greater than 0"),
    ({"loss.temperature": 0.01}, "loss.temperature", "must be >= 0.026"),
    ({"loss.base_temperature": 0}, "loss.base_temperature", "greater than 0"),
    ({"loss.weight": -1}, "loss.weight", "greater than or equal to 0"),
    ({"loss.max_views": 0}, "loss.max_views", "greater than or equal to 1"),
    ({"loss.max_samples": 0}, "loss.max_samples", "greater than or equal to 1"),
    ({"memory.size": -1}, "memory.size", "greater than or equal to 0"),
    ({"memory.pixel_update_freq": 0}, "memory.pixel_update_freq", "greater than or equal to 1"),
    ({"model.variant": "w32"}, "model.variant", "'w18_small', 'w18_small_v2', 'w18' or 'w48'"),
    ({"data.dataset": "ade20k"}, "data.dataset", "'canvases' or 'cityscapes'"),
    ({"train.workers": "two"}, "train.workers", "valid integer"),
    ({"train.iterations": 0}, "train.iterations", "greater than or equal to 1"),
    ({"optim.lr": 0}, "optim.lr", "greater than 0"),
    ({"optim.momentum": 1.0}, "optim.momentum", "less than 1"),
    ({"data.crop_size": [4, 4]}, "data.crop_size", ">= 8"),
    ({"data.scale_range": [2.0, 0.5]}, "data.scale_range", "low <= high"),
    ({"data.canvases.digit_size": [50, 40]}, "data.canvases.digit_size", "10 <= min <= max"),
    ({"data.hflip": "sometimes"}, "data.hflip", "valid boolean"),
    ({"tune.space": {}}, "tune.space", "search space is empty"),
    ({"loss.class_weights": [1.0, 2.0]}, "loss.class_weights", "needs 19 weights"),
    (
        {"loss.ignore_index": 254},
        "loss.ignore_index",
        "was removed: the ignore label is a fact of the dataset",
    ),
    ({"run.name": "a/b"}, "run.name", "plain folder name"),
    ({"loss": 0.1}, "loss", "is a section"),
    ({"losses.temperature": 0.1}, "losses.temperature", "unknown config key"),
]


@pytest.mark.parametrize(("overrides", "key", "message"), BAD_OVERRIDES, ids=[b[1] for b in BAD_OVERRIDES])
def test_bad_values_name_the_key_and_what_is_allowed(overrides: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(load_config(), overrides)
    assert info.value.key == key
    assert key in str(info.value)
    assert message in str(info.value)


def test_unknown_key_in_a_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  temprature: 0.2\n")
    with pytest.raises(ConfigError, match=r"loss\.temprature.*did you mean 'loss\.temperature'") as info:
        load_config(f)
    assert str(f) in str(info.value)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(f)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["loss.temperature"])
    assert parse_overrides(["model.pretrained=null", "train.amp=true"]) == {
        "model.pretrained": None,
        "train.amp": True,
    }


BAD_SPACES = [
    ({"loss.tempreture": {"uniform": [0.1, 1]}}, "loss.tempreture", "did you mean 'loss.temperature'"),
    ({"loss.temperature": {"uniform": [0.0, 1]}}, "loss.temperature", "greater than 0"),
    ({"loss.temperature": {"loguniform": [0.5, 0.1]}}, "loss.temperature", "low must be < high"),
    ({"loss.temperature": {"normal": [0, 1]}}, "loss.temperature", "unknown distribution"),
    ({"memory.size": {"choice": [0, -10]}}, "memory.size", "greater than or equal to 0"),
    ({"memory.size": {"int": [0.5, 10]}}, "memory.size", "int bounds must be integers"),
    ({"loss.max_views": {"int": [0, 10]}}, "loss.max_views", "greater than or equal to 1"),
    ({"model.variant": {"choice": ["w18", "w99"]}}, "model.variant", "w99"),
    ({"run.seed": {"int": [0, 3]}}, "run.seed", "cannot be searched"),
    ({"loss.weight": 0.3}, "loss.weight", "expected one of"),
]


@pytest.mark.parametrize(("space", "key", "message"), BAD_SPACES, ids=[b[1] for b in BAD_SPACES])
def test_bad_search_spaces(space: dict, key: str, message: str) -> None:
    cfg = apply_overrides(load_config(), {"tune.space": space, "tune.points_to_evaluate": []})
    with pytest.raises(ConfigError) as info:
        parse_space(cfg)
    assert info.value.key == key
    assert message in str(info.value)


def test_initial_points_follow_the_space() -> None:
    cfg = apply_overrides(load_config(), {"tune.space": {"loss.temperature": {"loguniform": [0.05, 0.5]}}})
    pts = initial_points(cfg, parse_space(cfg))
    assert pts == [{"loss.temperature": 0.1}, {"loss.temperature": 0.07}]
    narrow = apply_overrides(cfg, {"tune.space": {"loss.temperature": {"uniform": [0.2, 0.5]}}})
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[0\].*outside its search space"):
        initial_points(narrow, parse_space(narrow))


def test_every_key_can_be_searched() -> None:
    cfg = apply_overrides(
        load_config(),
        {
            "tune.space": {
                "model.variant": {"choice": ["w18_small", "w18"]},
                "optim.lr": {"loguniform": [1e-3, 1e-1]},
                "train.batch_size": {"int": [2, 8]},
            }
        },
    )
    kinds = {p.key: p.kind for p in parse_space(cfg)}
    assert kinds == {"model.variant": "choice", "optim.lr": "loguniform", "train.batch_size": "int"}


def test_share_warmup_off_reads_as_written_in_yaml(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `off` as false: in a file and in `--set`, it still means "off".
    cli = load_config(CONFIGS[0], parse_overrides(["tune.share_warmup=off"]))
    assert cli.tune.share_warmup == "off"
    f = tmp_path / "c.yaml"
    f.write_text("tune:\n  share_warmup: off\n")
    assert load_config(f).tune.share_warmup == "off"
    with pytest.raises(ConfigError, match="tune.share_warmup"):
        load_config(CONFIGS[0], parse_overrides(["tune.share_warmup=on"]))
