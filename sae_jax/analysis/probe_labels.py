"""Labels for probing, made offline from the corpus a store was harvested from.

A label *family* gives each token row one class (an index into the family's class names) or
`UNLABELED` (-1). Families, by corpus:

* the Python standard library (the default corpus; any text that is Python source):
  - `token_type`: the Python token the row's (sub)word lies in, from the stdlib `tokenize`
    module: NAME, KEYWORD (a NAME that `keyword.iskeyword`), OP, STRING (f-string pieces
    too), NUMBER or COMMENT. The model tokenizer's character offsets are mapped onto
    `tokenize`'s character spans: a subword takes the class of the Python token holding its
    first non-space character (a byte-level BPE token's leading space is skipped); a subword
    outside every such token (an `ERRORTOKEN`, a file `tokenize` rejects) is unlabeled.
  - `prose`: inside a docstring (the first statement of a module, class or function body,
    when it is a string, as `ast.get_docstring` defines it) or a comment (1), or code (0).
    A document `ast` cannot parse is unlabeled here.
  - `package`: the document's top-level stdlib package or module (`email/mime/text.py` ->
    `email`, `os.py` -> `os`), a document-level label.
* `.jsonl` files (`file_corpus`): every short string field of a record other than `text`
  (`{"text": ..., "lang": "de"}` -> family `lang`), a document-level label; plus `file`, the
  file a document came from, for any file corpus (one class when there is one file).

Everything here is a pure function of text and offsets, so it is tested on hand-written
source with known answers; `probe_data` applies it to a store's rows.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import tokenize
from pathlib import PurePosixPath

import numpy as np

UNLABELED = -1
TOKEN_TYPES = ("NAME", "KEYWORD", "OP", "STRING", "NUMBER", "COMMENT")
PROSE_CLASSES = ("code", "docstring_or_comment")
MAX_FIELD_CHARS = 64  # a jsonl string field longer than this is text, not a label
_STRING_PARTS = {name for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                 if hasattr(tokenize, name)}


def _line_starts(text: str) -> list[int]:
    """The character offset of each line's start, as `tokenize` numbers lines (from 1):
    `io.StringIO(text).readline` splits at '\\n' only."""
    starts, at = [0], 0
    for line in io.StringIO(text):
        at += len(line)
        starts.append(at)
    return starts


def _token_class(tok: tokenize.TokenInfo) -> int:
    """The `TOKEN_TYPES` index of a `tokenize` token, or UNLABELED."""
    name = tokenize.tok_name[tok.type]
    if tok.type == tokenize.NAME:
        return TOKEN_TYPES.index("KEYWORD" if keyword.iskeyword(tok.string) else "NAME")
    if tok.type == tokenize.STRING or name in _STRING_PARTS:
        return TOKEN_TYPES.index("STRING")
    if name in TOKEN_TYPES:  # OP, NUMBER, COMMENT
        return TOKEN_TYPES.index(name)
    return UNLABELED


def _docstring_spans(text: str, starts: list[int]) -> list[tuple[int, int]] | None:
    """Character spans of every docstring (module, class, function), or None if `ast`
    cannot parse the text. `ast` columns count UTF-8 bytes; they are turned into
    characters."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    lines = text.split("\n")

    def char(line: int, col: int) -> int:
        return starts[line - 1] + len(lines[line - 1].encode("utf-8")[:col].decode("utf-8"))

    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                v = first.value
                spans.append((char(v.lineno, v.col_offset), char(v.end_lineno, v.end_col_offset)))
    return spans


def python_char_labels(text: str) -> dict[str, np.ndarray]:
    """Per character of Python source: `token_type` (`TOKEN_TYPES` index) and `prose` (1 in a
    docstring or comment, 0 elsewhere in a token, UNLABELED outside tokens); int8 arrays of
    `len(text)`. Source `tokenize` stops on keeps what it read up to there."""
    starts = _line_starts(text)
    kind = np.full(len(text), UNLABELED, np.int8)
    prose = np.full(len(text), UNLABELED, np.int8)
    comment = TOKEN_TYPES.index("COMMENT")
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            cls = _token_class(tok)
            if cls == UNLABELED:
                continue
            a = starts[tok.start[0] - 1] + tok.start[1]
            b = starts[tok.end[0] - 1] + tok.end[1]
            kind[a:b] = cls
            prose[a:b] = cls == comment
    except (tokenize.TokenError, SyntaxError):
        pass  # unterminated brackets or strings, bad indentation: keep what was read
    docstrings = _docstring_spans(text, starts)
    if docstrings is None:
        prose[:] = UNLABELED
    else:
        for a, b in docstrings:
            prose[a:b] = np.where(prose[a:b] == UNLABELED, UNLABELED, 1)
    return {"token_type": kind, "prose": prose}


def subword_labels(text: str, offsets, char_labels: dict[str, np.ndarray]) -> dict[str,
                                                                                  np.ndarray]:
    """Each subword's class in every per-character family: the class of its first
    non-space character (UNLABELED for a subword of only spaces or with no characters).

    Args:
      text: the document.
      offsets: `(start, end)` character offsets of each subword (`tokenizers` encodings).
      char_labels: family -> int array of `len(text)` (`python_char_labels`).
    """
    firsts = np.full(len(offsets), -1, np.int64)
    for i, (a, b) in enumerate(offsets):
        for c in range(a, min(b, len(text))):
            if not text[c].isspace():
                firsts[i] = c
                break
    found = firsts >= 0
    out = {}
    for name, per_char in char_labels.items():
        labels = np.full(len(offsets), UNLABELED, np.int32)
        labels[found] = per_char[firsts[found]]
        out[name] = labels
    return out


def stdlib_package(source: str) -> str:
    """The top-level package or module of a stdlib document (`Document.source` is
    `relative/path.py:first-last`): `email/mime/text.py:1-40` -> `email`, `os.py:3-9` -> `os`."""
    path = PurePosixPath(source.rsplit(":", 1)[0])
    return path.parts[0] if len(path.parts) > 1 else path.stem


def source_file(source: str) -> str:
    """The file of a `file_corpus` document (`path:line` or `path:first-last`)."""
    return source.rsplit(":", 1)[0]


def jsonl_fields(line: str) -> dict[str, str]:
    """The document-level labels of one jsonl record: its string fields other than `text`,
    of at most MAX_FIELD_CHARS characters (a non-object or bad line has none)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items()
            if k != "text" and isinstance(v, str) and len(v) <= MAX_FIELD_CHARS}


def jsonl_record_labels(path, lines: set[int]) -> dict[int, dict[str, str]]:
    """`{line number: jsonl_fields}` of the wanted 1-based `lines` of a jsonl file."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number in lines:
                out[number] = jsonl_fields(line)
    return out


def encode_classes(values: list[str | None]) -> tuple[np.ndarray, list[str]]:
    """Strings (None = unlabeled) -> `(codes int32, sorted class names)`."""
    classes = sorted({v for v in values if v is not None})
    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([index[v] if v is not None else UNLABELED for v in values], np.int32)
    return codes, classes
