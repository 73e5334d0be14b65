"""Probing labels on hand-written text with known answers: Python token types and
docstring/comment spans mapped onto subword offsets, stdlib packages, jsonl record fields."""

import json

import numpy as np
import pytest

from sae_jax.analysis.probe_data import document_split, label_rows, sample_ranges
from sae_jax.analysis.probe_labels import (
    PROSE_CLASSES,
    TOKEN_TYPES,
    UNLABELED,
    encode_classes,
    jsonl_fields,
    python_char_labels,
    source_file,
    stdlib_package,
    subword_labels,
)
from sae_jax.errors import UserError
from sae_jax.lm.corpus import file_corpus, untruncated_copy

SOURCE = '''def f(x):  # add one
    """Döc: return x+1."""
    if x is None:
        return 'no'
    return x + 1.5
'''


def _names(labels, names):
    return [names[c] if c != UNLABELED else None for c in labels]


def test_minilm_subwords_get_their_python_token_and_prose_labels(tokenizer):
    enc = untruncated_copy(tokenizer).encode(SOURCE, add_special_tokens=False)
    got = subword_labels(SOURCE, enc.offsets, python_char_labels(SOURCE))
    kinds = _names(got["token_type"], TOKEN_TYPES)
    assert list(zip(enc.tokens, kinds))[:9] == [
        ("def", "KEYWORD"), ("f", "NAME"), ("(", "OP"), ("x", "NAME"), (")", "OP"),
        (":", "OP"), ("#", "COMMENT"), ("add", "COMMENT"), ("one", "COMMENT")]
    # the docstring: 3 quotes, "doc : return x + 1 .", 3 quotes, all STRING and prose
    assert kinds[9:22] == ["STRING"] * 13
    assert list(got["prose"][:22]) == [0] * 6 + [1] * 16
    assert list(zip(enc.tokens, kinds))[22:] == [
        ("if", "KEYWORD"), ("x", "NAME"), ("is", "KEYWORD"), ("none", "KEYWORD"), (":", "OP"),
        ("return", "KEYWORD"), ("'", "STRING"), ("no", "STRING"), ("'", "STRING"),
        ("return", "KEYWORD"), ("x", "NAME"), ("+", "OP"), ("1", "NUMBER"), (".", "NUMBER"),
        ("5", "NUMBER")]
    assert list(got["prose"][22:]) == [0] * 15  # a string that is not a docstring is code


def test_docstring_columns_after_non_ascii_are_characters_not_bytes():
    text = 'def fü(): "doc"\nclass C:\n    """Ünïcode."""\n    x = "s"  # c\n'
    labels = python_char_labels(text)
    prose = labels["prose"]
    doc1 = text.index('"doc"')
    assert (prose[doc1:doc1 + 5] == 1).all() and prose[doc1 - 2] == 0  # ':' is code
    doc2 = text.index('"""Ü')
    assert (prose[doc2:doc2 + 14] == 1).all()
    s = text.index('"s"')
    assert (prose[s:s + 3] == 0).all() and labels["token_type"][s] == TOKEN_TYPES.index("STRING")
    c = text.index("# c")
    assert (prose[c:c + 3] == 1).all()
    assert prose[text.index("x =")] == 0 and prose[text.index("x =") - 1] == UNLABELED  # space


def test_source_ast_cannot_parse_keeps_token_types_but_not_prose():
    text = "def f(:\n    return 1  # c\n"
    labels = python_char_labels(text)
    assert labels["token_type"][0] == TOKEN_TYPES.index("KEYWORD")
    assert (labels["prose"] == UNLABELED).all()


def test_hand_made_offsets_take_the_first_non_space_character():
    text = "x = 1"
    offsets = [(0, 1), (1, 3), (3, 5), (2, 2)]  # "x", " =" (BPE-style leading space), " 1", empty
    got = subword_labels(text, offsets, python_char_labels(text))
    assert _names(got["token_type"], TOKEN_TYPES) == ["NAME", "OP", "NUMBER", None]
    assert list(got["prose"]) == [0, 0, 0, UNLABELED]


def test_document_level_labels():
    assert stdlib_package("email/mime/text.py:1-40") == "email"
    assert stdlib_package("os.py:3-9") == "os"
    assert source_file("/data/a.jsonl:12") == "/data/a.jsonl"
    assert jsonl_fields('{"text": "hi", "lang": "de", "n": 3, "long": "' + "x" * 65 + '"}') \
        == {"lang": "de"}
    assert jsonl_fields("[1, 2]") == {} and jsonl_fields("not json") == {}
    codes, classes = encode_classes(["b", None, "a", "b"])
    assert classes == ["a", "b"] and codes.tolist() == [1, UNLABELED, 0, 1]


def test_jsonl_rows_get_their_record_fields_and_file(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    records = [{"text": "alpha beta", "lang": "en"}, {"text": "gamma", "lang": "de"},
               {"text": "delta epsilon", "topic": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    docs = list(file_corpus([path]))
    tok = untruncated_copy(tokenizer)
    encs = [tok.encode(d.text, add_special_tokens=False) for d in docs]
    doc_of = np.array([0, 0, 1, 2, 2])
    pos = np.array([0, 1, 0, 0, 1])
    ids = np.array([encs[d].ids[p] for d, p in zip(doc_of, pos)])
    labels = label_rows(docs, encs, doc_of, pos, ids, stdlib=False, where="s")
    codes, classes = labels["lang"]
    assert [classes[c] if c >= 0 else None for c in codes] == ["en", "en", "de", None, None]
    codes, classes = labels["topic"]
    assert [classes[c] if c >= 0 else None for c in codes] == [None, None, None, "x", "x"]
    assert labels["file"][1] == [str(path)] and "token_type" not in labels
    with pytest.raises(UserError, match="does not match the tokens stored in s"):
        label_rows(docs, encs, doc_of, pos, ids + 1, stdlib=False, where="s")


def test_stdlib_rows_get_python_labels(tokenizer):
    from sae_jax.lm.corpus import Document

    docs = [Document(0, "json/decoder.py:1-5", SOURCE)]
    enc = [untruncated_copy(tokenizer).encode(SOURCE, add_special_tokens=False)]
    pos = np.array([0, 7, 30])
    labels = label_rows(docs, enc, np.zeros(3, np.int64), pos,
                        np.asarray(enc[0].ids)[pos], stdlib=True, where="s")
    assert _names(labels["token_type"][0], TOKEN_TYPES) == ["KEYWORD", "COMMENT", "STRING"]
    assert _names(labels["prose"][0], PROSE_CLASSES) == ["code", "docstring_or_comment",
                                                          "code"]
    assert labels["package"][1] == ["json"] and labels["package"][0].tolist() == [0, 0, 0]


def test_sample_ranges_and_document_split():
    assert sample_ranges(100, 200) == [(0, 100)]
    ranges = sample_ranges(1000, 80, blocks=4)
    assert ranges[0] == (0, 20) and ranges[-1] == (980, 1000) and len(ranges) == 4
    docs = np.repeat(np.arange(10), 5)
    test = document_split(docs, seed=0, test_fraction=0.3)
    assert test.sum() == 15  # 3 whole documents
    for d in range(10):
        assert len(set(test[docs == d].tolist())) == 1
