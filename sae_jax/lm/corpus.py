"""Text to harvest activations from, and its cut into fixed-length token sequences.

**Corpora.** A `Corpus` is a description string (recorded in the store's `meta.json`) and a
re-iterable, lazy stream of `Document`s, each numbered in corpus order: documents are made
one file at a time as the stream is read, never all at once.

* `stdlib_corpus()` — the default, on every machine with Python: the standard library's own
  `.py` sources (`sysconfig.get_paths()["stdlib"]`), skipping test suites (`test/`, `tests/`,
  `idlelib/idle_test/`), `site-packages`/`dist-packages`, files that are not UTF-8, and the
  generated character-map codec tables (`encodings/cp1252.py` etc., any module defining a
  top-level `decoding_table`/`decoding_map`: ~0.46M tokens, 14 % of the library, of
  near-identical `0x80 -> EURO SIGN` table lines that would otherwise fill half of a 1M-token
  harvest). **Order:** files are sorted by the SHA-256 of their relative path, so the order
  never depends on how the filesystem lists them (it does depend on the Python version, which
  the description names), and any prefix of the corpus (what `--max-tokens` takes) is a
  spread sample of the whole library rather than the modules from `__future__` to `e`; the
  held-out tail of a store is still made of whole other files.
  **One document per top-level definition:** each file is cut into its module header
  (docstring, imports, constants: everything before the first top-level `def`/`class`) and one
  piece per top-level `def`/`class`, starting at its decorators and the comment lines right
  above it and running to the next one (so module-level code in between stays with the
  definition it follows; no line is dropped). Why: a function or class with its docstring and
  comments is the natural unit of meaning in source code (the closest thing it has to a
  paragraph), so a sequence's context is one coherent piece of code, never the tail of one
  function and the head of an unrelated one; and document positions point at something a
  feature dashboard can show whole. Blank-line paragraphs would cut functions into fragments
  and pad many tiny ones; whole files would be cheaper to run (fewer padded tails: ~97 % vs
  ~87 % of sequence slots hold real tokens at seq_len 128) but would mix definitions.
  Python 3.11's stdlib gives ~6,100 documents and ~2.9M WordPiece tokens.
* `file_corpus(paths)` — your own text. A path ending in `.jsonl` is read as one document per
  non-blank line (`{"text": ...}`; a record with empty text still takes its index, so
  document indices map back to your records). Any other file is UTF-8 text split into
  **blank-line-separated paragraphs**, one document each: paragraphs are the units a sentence
  encoder such as MiniLM was trained on, they keep memory bounded however large the file, and
  a long paragraph still becomes several sequences. A directory stands for every non-hidden
  file under it, in sorted order. `make_corpus(spec)` maps `None | path | [paths]` to one of
  these.

**Sequences.** `sequences(corpus, tokenizer, seq_len)` tokenises each document without
special tokens and without truncation, cuts its token stream into consecutive pieces of
`seq_len - 2` tokens and wraps each as `[CLS] piece [SEP] [PAD]...` of exactly `seq_len`
ids. A sequence never holds tokens of two documents: a long document becomes several
sequences, a short one (and the last piece of a long one) is padded. Every token keeps
`(document index, position in the document's token stream)`; positions restart at 0 for
each document and run on across its sequences; `[CLS]`, `[SEP]` and padding have position -1.
Everything is deterministic: the same corpus and tokenizer always give the same sequences.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_jax.errors import UserError

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                       "__pycache__"})
NO_POSITION = -1
_CODEC_TABLE = re.compile(r"^(decoding_table|decoding_map) = ", re.MULTILINE)
TOKENIZE_BATCH = 64  # documents per `encode_batch` call: parallel, yet memory stays bounded


@dataclass(frozen=True)
class Document:
    """One document: its index in corpus order, where it came from (`path:first-last line`),
    and its text."""

    index: int
    source: str
    text: str


@dataclass(frozen=True, eq=False)
class Corpus:
    """A description (for provenance) and a lazy, re-iterable stream of documents.

    Attributes:
      description: one line saying exactly what text this is (recorded in `meta.json`).
      read: a function returning a fresh iterator of `(source, text)` pairs; `__iter__`
        numbers them into `Document`s.
    """

    description: str
    read: Callable[[], Iterator[tuple[str, str]]]

    def __iter__(self) -> Iterator[Document]:
        for index, (source, text) in enumerate(self.read()):
            yield Document(index, source, text)

    def document(self, index: int) -> Document:
        """The document with this index (reads the corpus up to it), e.g. to show a token's
        context from a store's `positions`."""
        for doc in self:
            if doc.index == index:
                return doc
        raise UserError(f"the corpus has no document {index} ({self.description})")


# ---------------------------------------------------------------------------- the stdlib


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_source(path: Path) -> str | None:
    """The file's text, or None if it is not UTF-8 or is a generated charmap codec table."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return None if _CODEC_TABLE.search(text) else text


def _stdlib_files(root: Path) -> list[Path]:
    """The `.py` files under `root` that make documents (see the module docstring), in the
    order of the SHA-256 of their relative paths (independent of listing order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    found = [p for p in found if _read_source(p) is not None]
    return sorted(found, key=lambda p: (_path_hash(p.relative_to(root)), p.relative_to(root)))


def _path_hash(rel: Path) -> str:
    return hashlib.sha256(rel.as_posix().encode()).hexdigest()


def split_python_source(text: str) -> list[tuple[int, int, str]]:
    """Cuts a module into its header and one piece per top-level `def`/`class`.

    A piece starts at the definition's first decorator, or at the comment lines directly above
    it, and runs to the start of the next piece; the pieces concatenate back to `text`.
    Whitespace-only pieces are dropped. A file that does not parse is one piece.

    Returns:
      `(first_line, last_line, text)` per piece, 1-based inclusive line numbers.
    """
    lines = text.splitlines(keepends=True)
    try:
        body = ast.parse(text).body
    except (SyntaxError, ValueError):
        body = []
    starts, previous_end = [0], 0
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            while start - 1 >= previous_end and lines[start - 1].lstrip().startswith("#"):
                start -= 1
            starts.append(start)
        previous_end = node.end_lineno or node.lineno
    starts = sorted(set(starts)) + [len(lines)]
    return [(a + 1, b, "".join(lines[a:b])) for a, b in zip(starts, starts[1:])
            if "".join(lines[a:b]).strip()]


def stdlib_corpus(root: str | os.PathLike | None = None) -> Corpus:
    """The Python standard library's sources, one document per module header and per
    top-level definition (see the module docstring).

    Args:
      root: the stdlib directory (default: this interpreter's, `sysconfig`).
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise UserError(f"stdlib directory {root} does not exist")
    files = _stdlib_files(root)

    def read() -> Iterator[tuple[str, str]]:
        for path in files:
            text = _read_source(path)
            if text is None:  # changed since the listing
                continue
            rel = path.relative_to(root).as_posix()
            for first, last, piece in split_python_source(text):
                yield f"{rel}:{first}-{last}", piece

    description = (f"python-stdlib: the CPython {platform.python_version()} standard library's "
                   f".py sources at {root} ({len(files)} files; test suites, site-packages, "
                   "charmap codec tables and non-UTF-8 files skipped), in SHA-256-of-path "
                   "order, one document per module header and per top-level def/class")
    return Corpus(description, read)


# ---------------------------------------------------------------------------- user files


def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = [f for f in p.rglob("*") if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            files += sorted(inside, key=lambda f: f.relative_to(p).parts)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"corpus file {p} does not exist")
    return files


def _paragraphs(path: Path) -> Iterator[tuple[str, str]]:
    """Blank-line-separated paragraphs of a UTF-8 text file, read line by line."""
    lines: list[str] = []
    first = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    if not lines:
                        first = number
                    lines.append(line)
                elif lines:
                    yield f"{path}:{first}-{number - 1}", "".join(lines)
                    lines = []
            if lines:
                yield f"{path}:{first}-{first + len(lines) - 1}", "".join(lines)
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start} of a block)") from None


def _jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """One document per non-blank line of `{"text": ...}`."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f'{path}:{number}: expected a JSON object with a string '
                                    f'"text" field')
                yield f"{path}:{number}", record["text"]
    except UnicodeDecodeError:
        raise UserError(f"corpus file {path} is not UTF-8") from None


def file_corpus(paths: Sequence[str | os.PathLike]) -> Corpus:
    """Documents from your own files: `.jsonl` one per line, other files one per paragraph.

    Args:
      paths: files or directories (a directory = every non-hidden file under it, sorted).

    Raises:
      UserError: a path does not exist, or there are no files.
    """
    files = _expand(paths)
    if not files:
        raise UserError(f"no corpus files in {', '.join(map(str, paths)) or '(nothing)'}")

    def read() -> Iterator[tuple[str, str]]:
        for path in files:
            yield from (_jsonl(path) if path.suffix == ".jsonl" else _paragraphs(path))

    kinds = ", ".join(f"{p} ({'jsonl' if p.suffix == '.jsonl' else 'paragraphs'})"
                      for p in files[:5])
    if len(files) > 5:
        kinds += f" and {len(files) - 5} more"
    return Corpus(f"files: {kinds}; .jsonl one document per line, text one document per "
                  "blank-line-separated paragraph", read)


def make_corpus(spec: None | str | os.PathLike | Sequence[str | os.PathLike]) -> Corpus:
    """`None` -> the stdlib; a path or list of paths -> `file_corpus`; a Corpus as is."""
    if isinstance(spec, Corpus):
        return spec
    if spec is None:
        return stdlib_corpus()
    if isinstance(spec, (str, os.PathLike)):
        return file_corpus([spec])
    return file_corpus(list(spec))


# ---------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class TokenSequence:
    """One model input of `seq_len` tokens, all from one document.

    Attributes:
      input_ids: int32 `(seq_len,)`, `[CLS] tokens [SEP]` then padding.
      attention_mask: int32 `(seq_len,)`, 1 on `[CLS]`, tokens and `[SEP]`.
      doc: the document's index in the corpus.
      positions: int32 `(seq_len,)`, each token's position in the document's token stream,
        -1 on `[CLS]`, `[SEP]` and padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    doc: int
    positions: np.ndarray


@dataclass(frozen=True)
class Specials:
    """The special-token ids that frame every sequence (`None`: that token is not used)."""

    cls: int | None
    sep: int | None
    pad: int

    @property
    def count(self) -> int:
        return (self.cls is not None) + (self.sep is not None)

    @classmethod
    def of(cls, tokenizer, names=("[CLS]", "[SEP]", "[PAD]")) -> Specials:
        """Looks the BERT special tokens up in a `tokenizers.Tokenizer` (absent -> None)."""
        ids = [tokenizer.token_to_id(n) if n is not None else None for n in names]
        return cls(ids[0], ids[1], ids[2] if ids[2] is not None else 0)


def untruncated_copy(tokenizer):
    """A copy of a `tokenizers.Tokenizer` with truncation and padding off (the shared object
    keeps whatever settings its other users gave it)."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def tokenize_documents(docs: Iterable[Document], tokenizer,
                       batch: int = TOKENIZE_BATCH) -> Iterator[tuple[Document, list[int]]]:
    """`(document, token ids without special tokens)` for each document, in order."""
    tokenizer = untruncated_copy(tokenizer)
    pending: list[Document] = []

    def flush():
        encodings = tokenizer.encode_batch([d.text for d in pending], add_special_tokens=False)
        yield from zip(pending, (e.ids for e in encodings))

    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield from flush()
            pending = []
    if pending:
        yield from flush()


def sequences(corpus: Iterable[Document], tokenizer, seq_len: int,
              specials: Specials | None = None) -> Iterator[TokenSequence]:
    """Cuts each document's tokens into `seq_len`-token sequences (see the module docstring).

    Args:
      corpus: documents (a `Corpus`).
      tokenizer: a `tokenizers.Tokenizer` (e.g. `minilm.load_tokenizer()`); it is copied, not
        changed.
      seq_len: ids per sequence, special tokens included.
      specials: the framing tokens (default: `[CLS]`, `[SEP]`, `[PAD]` looked up in the
        tokenizer; a model without them gets unframed sequences).

    Yields:
      `TokenSequence`s in corpus order; documents with no tokens yield nothing.
    """
    specials = Specials.of(tokenizer) if specials is None else specials
    body = seq_len - specials.count
    if body < 1:
        raise UserError(f"seq_len must leave room for at least one token besides "
                        f"{specials.count} special tokens, got {seq_len}")
    head = [specials.cls] if specials.cls is not None else []
    tail = [specials.sep] if specials.sep is not None else []
    for doc, ids in tokenize_documents(corpus, tokenizer):
        for start in range(0, len(ids), body):
            piece = ids[start:start + body]
            n = len(head) + len(piece) + len(tail)
            input_ids = np.full(seq_len, specials.pad, np.int32)
            input_ids[:n] = head + piece + tail
            mask = np.zeros(seq_len, np.int32)
            mask[:n] = 1
            positions = np.full(seq_len, NO_POSITION, np.int32)
            positions[len(head):len(head) + len(piece)] = np.arange(start, start + len(piece))
            yield TokenSequence(input_ids, mask, doc.index, positions)
