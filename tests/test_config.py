"""The strict config system: unknown keys, wrong types, duplicate keys and overrides all fail loudly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlrec.config import dump_config, from_dict, load_config, parse_overrides
from rlrec.errors import ConfigError


@dataclass
class Inner:
    max_history: int = 20
    mode: Literal["a", "b"] = "a"
    lr: float = 1e-4
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ConfigError("max_history must be >= 1")


@dataclass
class Outer:
    name: str
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    optional: Inner | None = None


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"name": "x", "inner": {"max_histroy": 5}})
    assert "unknown key 'inner.max_histroy'" in str(err.value)
    assert "did you mean 'max_history'" in str(err.value)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'flg'; did you mean 'flag'"):
        from_dict(Outer, {"name": "x", "flg": True})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "flag": 1}, "key 'flag': expected bool"),
        ({"name": "x", "inner": {"max_history": "20"}}, "key 'inner.max_history': expected int"),
        ({"name": "x", "inner": {"max_history": True}}, "key 'inner.max_history': expected int"),
        ({"name": "x", "inner": {"mode": "c"}}, "key 'inner.mode': expected 'a' | 'b'"),
        ({"name": "x", "inner": {"weights": [1, "two"]}}, r"key 'inner.weights\[1\]': expected float"),
        ({"flag": True}, "missing required key 'name'"),
        ({"name": "x", "inner": {"max_history": 0}}, "in 'inner': max_history must be >= 1"),
    ],
)
def test_type_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_int_is_accepted_for_float_and_optional_section():
    config = from_dict(Outer, {"name": "x", "inner": {"lr": 1}, "optional": {"mode": "b"}})
    assert config.inner.lr == 1.0 and isinstance(config.inner.lr, float)
    assert config.optional == Inner(mode="b")


def test_duplicate_yaml_key_fails_with_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nflag: true\nname: b\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: key 'name' appears twice \(first on line 1\)"):
        load_config(Outer, path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\ninner: {max_history: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: invalid YAML"):
        load_config(Outer, path)


def test_overrides_are_typed_and_strict(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\ninner:\n  max_history: 20\n")
    config = load_config(Outer, path, ["--inner.max_history", "7", "flag=true", "--inner.weights=[0.5, 2]"])
    assert config.inner.max_history == 7 and config.flag is True and config.inner.weights == [0.5, 2.0]
    with pytest.raises(ConfigError, match="did you mean 'max_history'"):
        load_config(Outer, path, ["--inner.max_histor", "7"])
    with pytest.raises(ConfigError, match="cannot read override"):
        load_config(Outer, path, ["--inner.max_history"])


def test_numbers_with_an_exponent_are_floats_as_people_write_them(tmp_path):
    """YAML 1.1 reads `1e-5` as a string; a learning rate written that way is a float, in a file and an override."""
    path = tmp_path / "r.yaml"
    path.write_text("name: a\ninner:\n  lr: 3e-4\n  weights: [1e2, -2E+1, 0.5]\n")
    config = load_config(Outer, path, ["inner.lr=1e-5"])
    assert (
        config.inner.lr == 1e-5 and isinstance(config.inner.lr, float) and config.inner.weights == [100.0, -20.0, 0.5]
    )
    assert load_config(Outer, path).inner.lr == 3e-4
    assert load_config(Outer, path, ["name=1e5x"]).name == "1e5x"  # not a number: still a string
    with pytest.raises(ConfigError, match="key 'inner.max_history': expected int, got 1000.0"):
        load_config(Outer, path, ["inner.max_history=1e3"])  # an int written as a float is refused, not truncated


def test_parse_overrides_nests_keys():
    assert parse_overrides(["--a.b", "3", "a.c=x", "--d", "null"]) == {"a": {"b": 3, "c": "x"}, "d": None}


def test_dump_then_load_round_trips(tmp_path):
    config = from_dict(Outer, {"name": "x", "inner": {"weights": [1.0, 2.5], "mode": "b"}, "optional": {}})
    dump_config(config, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == config
