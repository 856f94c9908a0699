"""The public API: every advertised name resolves, and every registered config round-trips through
JSON and YAML to an equal object."""

from __future__ import annotations

import pytest

import weightsmith as ws
from weightsmith.config import registered
from weightsmith.errors import WeightsmithError


def test_every_public_name_resolves():
    missing = [n for n in ws.__all__ if getattr(ws, n, None) is None]
    assert not missing
    with pytest.raises(AttributeError):
        ws.no_such_thing  # noqa: B018


def _all_configs():
    import weightsmith.adapters  # noqa: F401
    import weightsmith.merge  # noqa: F401

    return [(kind, name, cls) for kind in ("adapter", "merge") for name, cls in registered(kind).items()]


@pytest.mark.parametrize("kind,name,cls", _all_configs(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_round_trip(kind, name, cls, suffix, tmp_path):
    config = cls.example() if hasattr(cls, "example") else cls()
    path = tmp_path / f"config{suffix}"
    ws.save_config(config, path)
    again = ws.load_config(path, kind)
    assert again == config and type(again) is cls
    assert ws.to_dict(again)["method"] == name


def test_unknown_method_and_option_are_named():
    with pytest.raises(WeightsmithError, match="unknown adapter method 'lorra'.*lora"):
        ws.config_from_dict({"method": "lorra"}, "adapter")
    with pytest.raises(WeightsmithError, match="no option 'rnak'.*rank"):
        ws.config_from_dict({"method": "lora", "rnak": 4}, "adapter")


def test_config_options_are_checked_against_their_field_types():
    """Every config built from a mapping (CLI --opt, recipe YAML) gets each value checked against its field's
    type: a number where a number goes, read from text where YAML left it text, else a message naming the
    method, the option, the type and the value."""
    from weightsmith.config import config_from_dict
    from weightsmith.errors import WeightsmithError

    cfg = config_from_dict({"method": "gptq", "damp": "1e-3", "bits": 3}, "compress")
    assert cfg.damp == 0.001 and cfg.bits == 3
    with pytest.raises(WeightsmithError, match=r"'gptq': option 'damp' takes a number, not 'abc'"):
        config_from_dict({"method": "gptq", "damp": "abc"}, "compress")
    with pytest.raises(WeightsmithError, match=r"option 'act_order' takes true or false"):
        config_from_dict({"method": "gptq", "act_order": "maybe"}, "compress")
