"""Reading catalog entries: labels, concept texts, and the run's catalog if it has one."""

import pytest

from sae_jax.analysis.catalog import (
    FeatureCatalog,
    catalog_index,
    concept_texts,
    feature_label,
    find_catalog,
    json_number,
    labels_from_catalog,
    token_strings,
    write_catalog,
)
from sae_jax.errors import UserError

ENTRY = {"id": 4, "label": None, "top_tokens": [["def", 9], ["class", 3], ["lambda", 1],
                                                 ["x", 1]],
         "top_examples": [{"tokens": ["def", "add"]}, {"tokens": ["  "]}]}


class _Tok:
    def id_to_token(self, i):
        return {1: "def"}.get(i)


def test_entries():
    assert feature_label(ENTRY) == "def / class / lambda"
    assert feature_label({**ENTRY, "label": "functions"}) == "functions"
    assert concept_texts(ENTRY, None) == ["def add"]  # empty contexts are dropped
    assert labels_from_catalog(FeatureCatalog({}, [ENTRY])) == {4: "def / class / lambda"}
    assert labels_from_catalog(None) == {}
    assert json_number(1 / 3) == 0.333333 and json_number(float("nan")) == 0.0
    assert token_strings(_Tok(), [1, 2]) == ["def", "<2>"]
    assert token_strings(None, [7]) == ["<7>"]


def test_find_catalog(tmp_path):
    assert find_catalog(tmp_path) is None and catalog_index(tmp_path) == {}
    write_catalog(FeatureCatalog({"width": 8}, [ENTRY]), tmp_path)
    assert find_catalog(tmp_path).feature(4)["top_tokens"][0] == ["def", 9]
    assert catalog_index(tmp_path, n_tokens=2) == {4: {"label": None,
                                                       "top_tokens": ["def", "class"]}}
    (tmp_path / "feature_catalog.json").write_text('{"header": {}}')
    with pytest.raises(UserError, match="is damaged"):
        find_catalog(tmp_path)
