"""The corpora (stdlib, text paragraphs, JSONL) and their cut into token sequences."""

import hashlib
import itertools
import json
import os

import numpy as np
import pytest

from sae_jax.errors import UserError
from sae_jax.lm import corpus as corpus_mod
from sae_jax.lm import minilm
from sae_jax.lm.corpus import (
    NO_POSITION,
    Corpus,
    file_corpus,
    make_corpus,
    sequences,
    split_python_source,
    stdlib_corpus,
)

CLS, SEP, PAD = 101, 102, 0


def _ids(tokenizer, text):
    return corpus_mod.untruncated_copy(tokenizer).encode(text, add_special_tokens=False).ids


def test_python_source_splits_at_top_level_definitions():
    text = ('"""Doc."""\nimport os\n\n\n# helper for f\n@decorator\ndef f():\n    """F."""\n'
            '    return 1\n\nX = 2\n\nclass C:\n    def m(self):\n        pass\n')
    pieces = split_python_source(text)
    assert "".join(p for _, _, p in pieces) == text
    assert [p.splitlines()[0] for _, _, p in pieces] == ['"""Doc."""', "# helper for f",
                                                         "class C:"]
    assert [(a, b) for a, b, _ in pieces] == [(1, 4), (5, 12), (13, 15)]
    assert split_python_source("def broken(:\n  pass\n") == [(1, 2, "def broken(:\n  pass\n")]


def _fake_stdlib(root):
    files = {
        "b.py": "def g():\n    return 2\n",
        "a.py": '"""A."""\n\ndef f():\n    return 1\n',
        "pkg/__init__.py": "",
        "pkg/mod.py": "class K:\n    pass\n",
        "pkg/tests/test_x.py": "def test(): pass\n",
        "test/test_y.py": "def test(): pass\n",
        "idlelib/idle_test/t.py": "x = 1\n",
        "idlelib/run.py": "x = 1\n",
        "site-packages/lib.py": "x = 1\n",
        "notes.txt": "not python\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "cp1.py").write_text("import codecs\n\ndecoding_table = (\n    '\\x00'\n)\n")


def test_stdlib_corpus_skips_tests_and_is_listing_order_independent(tmp_path, monkeypatch):
    _fake_stdlib(tmp_path)
    corpus = stdlib_corpus(tmp_path)
    docs = list(corpus)
    files = ["a.py", "b.py", "idlelib/run.py", "pkg/mod.py"]  # in SHA-256-of-path order
    files.sort(key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    lines = {"a.py": ["1-2", "3-4"], "b.py": ["1-2"], "idlelib/run.py": ["1-1"],
             "pkg/mod.py": ["1-2"]}
    assert [d.source for d in docs] == [f"{f}:{span}" for f in files for span in lines[f]]
    assert [d.index for d in docs] == list(range(5))
    assert docs == list(corpus)  # re-iterable, same result
    assert "5 files" in corpus.description and "3." in corpus.description
    assert corpus.document(3) == docs[3]

    real_walk = os.walk

    def reversed_walk(top):  # the filesystem lists entries in the opposite order
        for dirpath, dirnames, filenames in real_walk(top):
            dirnames.reverse()
            filenames.reverse()
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(corpus_mod.os, "walk", reversed_walk)
    assert list(stdlib_corpus(tmp_path)) == docs


def test_real_stdlib_corpus_is_deterministic():
    first = list(itertools.islice(stdlib_corpus(), 200))
    again = list(itertools.islice(stdlib_corpus(), 200))
    assert first == again
    assert all(d.text.strip() for d in first)
    assert not any("/test/" in d.source or d.source.startswith("test/") for d in first)


def test_sequences_never_cross_documents_and_positions_restart(tokenizer):
    texts = ["short one.", "word " * 70, "", "a medium length sentence about cats and dogs."]
    corpus = Corpus("test", lambda: iter((f"t{i}", t) for i, t in enumerate(texts)))
    seq_len = 16
    seqs = list(sequences(corpus, tokenizer, seq_len))
    by_doc = {}
    for s in seqs:
        assert s.input_ids.shape == s.attention_mask.shape == s.positions.shape == (seq_len,)
        n = int(s.attention_mask.sum())
        assert s.attention_mask[:n].all() and not s.attention_mask[n:].any()
        assert s.input_ids[0] == CLS and s.input_ids[n - 1] == SEP
        assert (s.input_ids[n:] == PAD).all()
        assert (s.positions[[0, *range(n - 1, seq_len)]] == NO_POSITION).all()
        by_doc.setdefault(s.doc, []).append(s)
    assert sorted(by_doc) == [0, 1, 3]  # the empty document yields nothing
    for doc, group in by_doc.items():
        content = np.concatenate([s.input_ids[1:int(s.attention_mask.sum()) - 1] for s in group])
        positions = np.concatenate([s.positions[s.positions != NO_POSITION] for s in group])
        np.testing.assert_array_equal(content, _ids(tokenizer, texts[doc]))
        np.testing.assert_array_equal(positions, np.arange(len(content)))
    assert len(by_doc[1]) == -(-len(_ids(tokenizer, texts[1])) // (seq_len - 2)) > 1
    again = list(sequences(corpus, tokenizer, seq_len))
    assert all((a.input_ids == b.input_ids).all() and a.doc == b.doc for a, b in zip(seqs, again))
    with pytest.raises(UserError, match="seq_len"):
        next(sequences(corpus, tokenizer, 2))


def test_sequences_leave_the_shared_tokenizer_alone(tokenizer):
    tokenizer.enable_truncation(max_length=minilm.MAX_SEQ_LEN)
    corpus = Corpus("test", lambda: iter([("t", "word " * 600)]))
    assert sum(int((s.positions >= 0).sum()) for s in sequences(corpus, tokenizer, 64)) == 600
    assert tokenizer.truncation["max_length"] == minilm.MAX_SEQ_LEN


def test_text_files_are_paragraphs_and_jsonl_lines_are_documents(tmp_path):
    (tmp_path / "a.txt").write_text("First para\nline two.\n\n\n  \nSecond para.\n")
    records = [{"text": "one"}, {"text": ""}, {"text": "three", "id": 7}]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    docs = list(file_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]))
    assert [(d.index, d.text) for d in docs] == [
        (0, "First para\nline two.\n"), (1, "Second para.\n"), (2, "one"), (3, ""), (4, "three")]
    assert docs[0].source.endswith("a.txt:1-2") and docs[1].source.endswith("a.txt:6-6")
    assert docs[4].source.endswith("b.jsonl:3")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "z.txt").write_text("z\n")
    (tmp_path / "dir" / "y.txt").write_text("y\n")
    (tmp_path / "dir" / ".hidden").write_text("h\n")
    assert [d.text for d in make_corpus(tmp_path / "dir")] == ["z\n", "y\n"]  # sub/ < y.txt
    assert make_corpus(None).description.startswith("python-stdlib")


def test_corpus_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        file_corpus([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no corpus files"):
        file_corpus([tmp_path / "empty"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object"):
        list(file_corpus([tmp_path / "bad.jsonl"]))
    (tmp_path / "bad2.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"bad2.jsonl:1: not JSON"):
        list(file_corpus([tmp_path / "bad2.jsonl"]))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(file_corpus([tmp_path / "latin.txt"]))
