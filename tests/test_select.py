"""Selector: one matching rule for globs, regexes and words (weight name or module name)."""

from __future__ import annotations

import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.select import Selector, module_name

NAMES = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.query.bias",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.intermediate.dense.bias",
    "encoder.layer.0.output.dense.weight",
    "encoder.layer.1.intermediate.dense.weight",
    "embeddings.LayerNorm.weight",
]
DENSE = [n for n in NAMES if ".intermediate.dense." in n]


@pytest.mark.parametrize(
    "pattern",
    [
        "*.intermediate.dense",  # module glob
        "*.intermediate.dense.*",  # weight glob
        r"re:intermediate\.dense$",  # regex anchored at the module name
        r"re:intermediate\.dense",  # unanchored regex
        "intermediate.dense",  # dotted words
    ],
)
def test_module_and_weight_forms_select_the_same_tensors(pattern: str) -> None:
    assert Selector.of(pattern).filter(NAMES) == DENSE


def test_weight_only_patterns_and_words_stay_precise() -> None:
    assert Selector.of("*.intermediate.dense.weight").filter(NAMES) == [DENSE[0], DENSE[2]]
    assert Selector.of("query").filter(NAMES) == NAMES[:2]
    assert Selector.of("uery").filter(NAMES) == []  # a word matches whole dotted components only
    assert Selector.of("*.dense").filter(NAMES) == [n for n in NAMES if ".dense." in n]
    sel = Selector(include=("*.intermediate.dense",), exclude=("re:layer\\.1\\.",))
    assert sel.filter(NAMES) == DENSE[:2]
    assert module_name("a.b.weight") == "a.b" and module_name("a.b.bias") == "a.b"
    assert module_name("a.weight_g") == "a.weight_g"


def test_require_each_names_the_pattern_that_matches_nothing() -> None:
    sel = Selector.of("*.intermediate.dense,*.qeury")
    assert sel.require(NAMES) == DENSE  # one pattern matched: fine without each
    with pytest.raises(WeightsmithError, match=r"'\*\.qeury' matches none of the 7 tensors"):
        sel.require(NAMES, "tensors", each=True)
    with pytest.raises(WeightsmithError, match="matches none"):
        Selector.of("nothing.here").require(NAMES)


@pytest.mark.parametrize("bad", ["re:[", "re:(?P<x"])
def test_invalid_regex_is_a_user_error(bad: str) -> None:
    with pytest.raises(WeightsmithError, match="not a valid regex"):
        Selector.of(bad)
    with pytest.raises(WeightsmithError, match="not a valid regex"):
        Selector(exclude=(bad,))


def test_non_string_pattern_is_a_user_error() -> None:
    with pytest.raises(WeightsmithError, match="got a value of type int"):
        Selector.of([1])  # type: ignore[list-item]
