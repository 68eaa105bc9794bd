"""Write tokenized text as Parquet token shards, one directory and manifest per domain split.

Each shard ``{domain}-{split}-{n:06d}.parquet`` has one row per document: ``doc_id``
(string) and ``tokens`` (``list<int32>``). The row is the document's stable address
(``shard:row``), the unit a ledger accounts for. A ``manifest.json`` beside the shards
records the tokenizer (name, ``vocab_size``, ``eos_id``, ``pad_id``) and per shard its
document and token counts, so a reader can plan an epoch without opening a shard.

Input text comes from files, a directory, a glob, or JSONL (one document per line,
text under a configurable field); bad input is a :class:`DataError` naming the file and
line. Any callable ``str -> list[int]`` tokenizes, given its ``vocab_size`` and
``eos_id``; the default is :class:`~mixflow.data.byte_tokenizer.ByteTokenizer`.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixflow.data.byte_tokenizer import ByteTokenizer
from mixflow.data.text_domains import TextDocument, split_validation
from mixflow.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "mixflow-token-shards"
SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.list_(pa.int32()))])
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TokenShardInfo:
    file: str
    num_docs: int
    num_tokens: int


@dataclass(frozen=True)
class TokenManifest:
    domain: str
    split: str
    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    shards: list[TokenShardInfo] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def to_json(self) -> dict:
        out = {"format": FORMAT, **asdict(self)}
        out["num_docs"], out["num_tokens"] = self.num_docs, self.num_tokens
        return out


def read_manifest(directory: str | Path) -> TokenManifest:
    """The manifest of a token-shard directory; a missing or malformed one is a :class:`DataError`."""
    from mixflow.data.object_store import PROCESS_STATS, RemoteDir, read_object

    path = directory / MANIFEST if isinstance(directory, RemoteDir) else Path(directory) / MANIFEST
    try:
        if isinstance(path, RemoteDir):  # in object storage
            try:
                raw = json.loads(read_object(path.url, path.store.options, PROCESS_STATS))
            except DataError as err:
                raise DataError(f"cannot read token-shard manifest: {err.reason}", shard=str(path)) from None
        else:
            raw = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read token-shard manifest: {exc.strerror}", shard=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest is not valid JSON: {exc.msg}", shard=str(path), offset=exc.pos) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"not a {FORMAT} manifest (field 'format' must be {FORMAT!r})", shard=str(path))
    try:
        shards = [TokenShardInfo(str(s["file"]), int(s["num_docs"]), int(s["num_tokens"])) for s in raw["shards"]]
        return TokenManifest(str(raw["domain"]), str(raw["split"]), str(raw["tokenizer"]), int(raw["vocab_size"]),
                             int(raw["eos_id"]), int(raw["pad_id"]), shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"manifest field missing or malformed: {exc}", shard=str(path)) from None


class TokenShardWriter:
    """Tokenizes documents into ``{domain}-{split}-{n:06d}.parquet`` shards plus ``manifest.json``.

    A shard is closed once its tokens reach ``max_bytes`` (4 bytes per token, before
    Parquet compression) or it holds ``max_docs`` documents.

    >>> with TokenShardWriter("out/python/train", "python", max_bytes=2**20) as w:
    ...     w.write("stdlib/json/decoder.py", source_text)
    """

    def __init__(self, directory: str | Path, domain: str, split: str = "train",
                 tokenizer: Callable[[str], Sequence[int]] | None = None, vocab_size: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, tokenizer_name: str | None = None,
                 max_bytes: int = 32 * 2**20, max_docs: int | None = None):
        if not domain or any(c in domain for c in "/\\: "):
            raise ValueError(f"domain {domain!r} must be non-empty without '/', '\\', ':' or spaces")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if max_docs is not None and max_docs <= 0:
            raise ValueError(f"max_docs must be positive, got {max_docs}")
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        vocab_size = vocab_size if vocab_size is not None else getattr(tok, "vocab_size", None)
        eos_id = eos_id if eos_id is not None else getattr(tok, "eos_id", None)
        if vocab_size is None or eos_id is None:
            raise ValueError("a tokenizer without vocab_size/eos_id attributes needs vocab_size= and eos_id= given")
        pad_id = pad_id if pad_id is not None else getattr(tok, "pad_id", eos_id)
        for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got {value}")
        if vocab_size > 2**31:
            raise ValueError(f"vocab_size must fit int32 token ids, got {vocab_size}")
        self.tokenizer = tok
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = tokenizer_name or getattr(tok, "name", None) or getattr(tok, "__name__", type(tok).__name__)
        self.manifest = TokenManifest(domain, split, str(name), int(vocab_size), int(eos_id), int(pad_id))
        self.max_bytes = max_bytes
        self.max_docs = max_docs
        self._ids: list[str] = []
        self._tokens: list[np.ndarray] = []
        self._bytes = 0
        self._seen: set[str] = set()

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def paths(self) -> list[Path]:
        return [self.directory / s.file for s in self.manifest.shards]

    def write(self, doc_id: str, text: str) -> int:
        """Tokenize and add one document; returns its token count."""
        if not text.strip():
            raise DataError("empty text", key=doc_id)
        return self.write_tokens(doc_id, self.tokenizer(text))

    def write_tokens(self, doc_id: str, tokens: Sequence[int] | np.ndarray) -> int:
        """Add one already-tokenized document; ids must lie in ``[0, vocab_size)``."""
        if not doc_id:
            raise ValueError("doc_id must be non-empty")
        if doc_id in self._seen:
            raise ValueError(f"duplicate doc_id {doc_id!r}")
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise DataError("document has no tokens", key=doc_id)
        bad = np.flatnonzero((arr < 0) | (arr >= self.manifest.vocab_size))
        if bad.size:
            raise DataError(f"token id {int(arr[bad[0]])} is outside the vocabulary [0, {self.manifest.vocab_size})",
                            key=doc_id, offset=int(bad[0]))
        self._seen.add(doc_id)
        full = self.max_docs is not None and len(self._ids) >= self.max_docs
        if self._ids and (full or self._bytes + 4 * arr.size > self.max_bytes):
            self._flush()
        self._ids.append(doc_id)
        self._tokens.append(arr.astype(np.int32))
        self._bytes += 4 * arr.size
        return int(arr.size)

    def _flush(self) -> None:
        if not self._ids:
            return
        name = f"{self.manifest.domain}-{self.manifest.split}-{len(self.manifest.shards):06d}.parquet"
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(self._tokens)))
        table = pa.Table.from_arrays([pa.array(self._ids, pa.string()), tokens], schema=SCHEMA)
        pq.write_table(table, self.directory / name)
        self.manifest.shards.append(TokenShardInfo(name, len(self._ids), int(lengths.sum())))
        self._ids, self._tokens, self._bytes = [], [], 0

    def close(self) -> None:
        """Write the last shard and the manifest."""
        self._flush()
        (self.directory / MANIFEST).write_text(json.dumps(self.manifest.to_json(), indent=1) + "\n")


# --------------------------------------------------------------------------- text inputs


def _jsonl_documents(path: Path, text_field: str) -> list[TextDocument]:
    docs = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"line {lineno} is not valid JSON: {exc}", shard=str(path), key=where) from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"line {lineno} has no field {text_field!r}", shard=str(path), key=where)
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"line {lineno}: field {text_field!r} must be a string, got "
                                f"{type(text).__name__}", shard=str(path), key=where)
            if not text.strip():
                raise DataError(f"line {lineno}: empty text in field {text_field!r}", shard=str(path), key=where)
            docs.append(TextDocument(where, text))
    return docs


def _text_document(path: Path) -> TextDocument:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc.reason}", shard=str(path), offset=exc.start) from None
    if not text.strip():
        raise DataError("empty text file", shard=str(path))
    return TextDocument(str(path), text)


def read_text_inputs(path_or_glob: str | Path, text_field: str = "text") -> list[TextDocument]:
    """Documents from a file, a directory (every file below it) or a glob, in sorted path order.

    ``*.jsonl`` files hold one document per line (text under ``text_field``, id
    ``file:line``); any other file is one UTF-8 document whose id is its path.
    """
    spec = str(path_or_glob)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"no input files match {spec!r}")
    docs: list[TextDocument] = []
    for f in files:
        docs += _jsonl_documents(f, text_field) if f.suffix == ".jsonl" else [_text_document(f)]
    return docs


def write_token_shards(documents: Iterable[TextDocument], directory: str | Path, domain: str,
                       split: str = "train", **writer_kw) -> TokenManifest:
    """Tokenize ``documents`` into one shard directory; returns its manifest."""
    with TokenShardWriter(directory, domain, split, **writer_kw) as writer:
        for doc in documents:
            writer.write(doc.doc_id, doc.text)
    return writer.manifest


def write_domain_splits(documents: list[TextDocument], out_dir: str | Path, domain: str,
                        val_fraction: float = 0.1, **writer_kw) -> dict[str, TokenManifest]:
    """Split by document (:func:`split_validation`) and write ``out_dir/{domain}/{train,validation}``."""
    train, validation = split_validation(documents, val_fraction, salt=domain)
    out = {"train": write_token_shards(train, Path(out_dir) / domain / "train", domain, "train", **writer_kw)}
    if validation:
        out["validation"] = write_token_shards(validation, Path(out_dir) / domain / "validation", domain,
                                               "validation", **writer_kw)
    return out
