"""Real text domains built from files already on this machine (no downloads).

Data-mixture methods need several genuinely different domains (DoReMi: Xie et al.,
"DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023;
Aioli: Chen et al., "Aioli: A Unified Optimization Framework for Language Model Data
Mixing", ICLR 2025). Every Linux machine with Python carries four:

* ``python``: the Python standard library's ``.py`` sources (tests, site-packages and the
  generated codec tables of ``encodings`` left out).
* ``c_headers``: C headers under ``/usr/include``.
* ``docs``: English documentation: Python's ``pydoc_data.topics`` (the text of
  ``help()``) and ``README*`` / ``*.txt`` / ``*.md`` files under ``/usr/share/doc``
  (gzip-compressed ones decompressed).
* ``licenses``: ``/usr/share/common-licenses``, ``/usr/share/doc/*/copyright`` and the
  licence files of installed Python distributions.

Selection is deterministic: candidate files are listed in sorted order, visited in the
order of a hash of their document id (so a size cap samples the whole tree, not the
first directory), cut at a line boundary to ``max_doc_bytes``, and taken until the
domain holds ``max_bytes``. Files that are not UTF-8, contain NUL bytes, are shorter
than :data:`MIN_DOC_BYTES`, or repeat an earlier document's exact content are passed
over. The held-out validation split is chosen by document, from a hash of its id.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mixflow.errors import DataError

MACHINE_DOMAINS = ("python", "c_headers", "docs", "licenses")
MIN_DOC_BYTES = 32
_PYTHON_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
_DOC_SUFFIXES = (".txt", ".md", ".rst", ".txt.gz", ".md.gz", ".rst.gz")
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


@dataclass(frozen=True)
class TextDocument:
    doc_id: str
    text: str


@dataclass(frozen=True)
class TextDomain:
    name: str
    train: list[TextDocument]
    validation: list[TextDocument]


# A candidate is a document id and where its text comes from: a file, or the text itself.
Candidate = tuple[str, "Path | str"]


def _walk(root: Path, keep: Callable[[str], bool], skip_dirs: Iterable[str] = ()) -> list[Path]:
    """Files under ``root`` whose name passes ``keep``, sorted; symlinked directories are not followed."""
    skip = set(skip_dirs)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out += [Path(dirpath) / f for f in sorted(filenames) if keep(f)]
    return sorted(out)


def _under(prefix: str, root: Path, paths: list[Path]) -> list[Candidate]:
    return [(f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in paths]


def _python_candidates() -> list[Candidate]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return _under("stdlib", root, _walk(root, lambda f: f.endswith(".py"), _PYTHON_SKIP_DIRS))


def _c_header_candidates() -> list[Candidate]:
    root = Path("/usr/include")
    return _under("include", root, _walk(root, lambda f: f.endswith(".h")))


def _docs_candidates() -> list[Candidate]:
    out: list[Candidate] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    out += [(f"pydoc/{name}", text) for name, text in sorted(topics.items())]
    root = Path("/usr/share/doc")
    keep = lambda f: f.startswith("README") or f.endswith(_DOC_SUFFIXES)  # noqa: E731
    return out + _under("doc", root, _walk(root, keep))


def _license_candidates() -> list[Candidate]:
    out: list[Candidate] = []
    root = Path("/usr/share/common-licenses")
    out += _under("common-licenses", root, _walk(root, lambda f: True))
    root = Path("/usr/share/doc")
    out += _under("doc", root, _walk(root, lambda f: f == "copyright"))
    root = Path(sysconfig.get_paths()["purelib"])
    dists = sorted(root.glob("*.dist-info")) if root.is_dir() else []
    for dist in dists:
        files = _walk(dist, lambda f: f.upper().startswith(_LICENSE_PREFIXES) and not f.endswith(".py"))
        out += _under("site-packages", root, files)
    return out


_SOURCES: dict[str, Callable[[], list[Candidate]]] = {
    "python": _python_candidates,
    "c_headers": _c_header_candidates,
    "docs": _docs_candidates,
    "licenses": _license_candidates,
}


def _doc_hash(salt: str, doc_id: str) -> bytes:
    return hashlib.blake2b(f"{salt}\0{doc_id}".encode("utf-8"), digest_size=8).digest()


def _read_prefix(source: Path | str, limit: int) -> bytes | None:
    """Up to ``limit + 1`` bytes of a candidate (``None`` if unreadable)."""
    if isinstance(source, str):
        return source.encode("utf-8")[:limit + 1]
    try:
        if source.name.endswith(".gz"):
            with gzip.open(source, "rb") as fh:
                return fh.read(limit + 1)
        with source.open("rb") as fh:
            return fh.read(limit + 1)
    except (OSError, EOFError):
        return None


def _cut_at_line(data: bytes, limit: int) -> bytes:
    """``data`` if it fits in ``limit`` bytes, else its longest prefix ending at a newline."""
    if len(data) <= limit:
        return data
    return data[:data.rfind(b"\n", 0, limit) + 1]


def machine_documents(name: str, max_bytes: int = 4 * 2**20, max_doc_bytes: int = 64 * 2**10) -> list[TextDocument]:
    """The documents of machine domain ``name``, at most ``max_bytes`` of UTF-8 text, sorted by id."""
    if name not in _SOURCES:
        raise ValueError(f"unknown text domain {name!r}; choose one of {', '.join(MACHINE_DOMAINS)}")
    if max_bytes < MIN_DOC_BYTES or max_doc_bytes < MIN_DOC_BYTES:
        raise ValueError(f"max_bytes and max_doc_bytes must be >= {MIN_DOC_BYTES}, got {max_bytes} and "
                         f"{max_doc_bytes}")
    candidates = sorted(_SOURCES[name](), key=lambda c: c[0])
    candidates.sort(key=lambda c: _doc_hash(name, c[0]))
    budget = max_bytes
    seen: set[bytes] = set()
    docs = []
    for doc_id, source in candidates:
        if budget < MIN_DOC_BYTES:
            break
        raw = _read_prefix(source, min(max_doc_bytes, budget))
        if raw is None or b"\0" in raw:
            continue
        data = _cut_at_line(raw, min(max_doc_bytes, budget))
        if len(data.strip()) < MIN_DOC_BYTES:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append(TextDocument(doc_id, text))
        budget -= len(data)
    return sorted(docs, key=lambda d: d.doc_id)


def split_validation(docs: list[TextDocument], val_fraction: float,
                     salt: str = "") -> tuple[list[TextDocument], list[TextDocument]]:
    """Hold out ``max(1, round(val_fraction * n))`` documents (none when ``val_fraction`` is 0).

    The held-out documents are those with the smallest hash of ``(salt, doc_id)``: the
    split depends on document ids only, not on their order or on the run's seed. Both
    halves keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError("duplicate document id", key=dup)
    if val_fraction == 0.0:
        return list(docs), []
    k = max(1, round(val_fraction * len(docs)))
    if len(docs) - k < 1:
        raise DataError(f"{len(docs)} document(s) cannot be split into non-empty train and validation "
                        f"parts (val_fraction {val_fraction})", key=salt or None)
    held = set(sorted(ids, key=lambda i: _doc_hash(salt, i))[:k])
    return [d for d in docs if d.doc_id not in held], [d for d in docs if d.doc_id in held]


def machine_text_domain(name: str, max_bytes: int = 4 * 2**20, max_doc_bytes: int = 64 * 2**10,
                        val_fraction: float = 0.1) -> TextDomain:
    """Machine domain ``name`` split into train and held-out validation documents."""
    docs = machine_documents(name, max_bytes, max_doc_bytes)
    if len(docs) < 2:
        raise DataError(f"text domain {name!r} found {len(docs)} readable document(s) on this machine; "
                        "need at least 2")
    train, validation = split_validation(docs, val_fraction, salt=name)
    return TextDomain(name, train, validation)


def machine_text_domains(names: Iterable[str] = MACHINE_DOMAINS, max_bytes: int = 4 * 2**20,
                         max_doc_bytes: int = 64 * 2**10, val_fraction: float = 0.1) -> dict[str, TextDomain]:
    """Several machine domains (default: all four), each capped at ``max_bytes``."""
    return {name: machine_text_domain(name, max_bytes, max_doc_bytes, val_fraction) for name in names}
