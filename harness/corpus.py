"""The text the embedded models learn from and are judged on: what every Python installation carries.

Documents are the standard library's own `.py` sources (its `test` packages and `site-packages` left
out) and the pydoc documentation topics (`pydoc_data.topics`, the text `help('FOR')` prints). They
are read from this interpreter at run time, never copied into the repository.

The train / held-out split is by document and deterministic: a document is held out when the
SHA-256 of its name, read as an integer, is 0 modulo HELDOUT_MODULUS. The same Python version gives
the same split on every machine; `corpus_fingerprint` names the exact held-out text in records.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_MODULUS = 20  # about 1 document in 20 is held out
EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages", "__pycache__", "idle_test"})
# Documents are joined by this separator, which the tokenizer keeps as one special token.
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Document:
    name: str  # 'stdlib/json/decoder.py' or 'topics/for'
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def documents() -> list[Document]:
    """Every document of this installation, sorted by name (so order never depends on the file system)."""
    root = stdlib_root()
    docs = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few stdlib files are deliberately not UTF-8
            continue
        if text.strip():
            docs.append(Document(f"stdlib/{relative.as_posix()}", text))
    from pydoc_data.topics import topics

    docs.extend(Document(f"topics/{name}", text) for name, text in topics.items() if text.strip())
    return sorted(docs, key=lambda doc: doc.name)


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out), each in the order given."""
    train = [doc for doc in docs if not is_heldout(doc.name)]
    heldout = [doc for doc in docs if is_heldout(doc.name)]
    return train, heldout


def join(docs: list[Document]) -> str:
    """One stream of text, each document ended by EOS."""
    return "".join(doc.text + EOS for doc in docs)


def corpus_fingerprint(docs: list[Document]) -> str:
    """A short hash of names and texts, recorded beside every figure measured on them."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    return digest.hexdigest()[:16]


def python_version() -> str:
    """The corpus depends on the interpreter's standard library: records name its version."""
    return ".".join(map(str, sys.version_info[:3]))
