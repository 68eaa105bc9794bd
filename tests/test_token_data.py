"""Unit tests for the byte tokenizer, text domains, Parquet token shards and the packed token source."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixflow.cli import main
from mixflow.data.bad_samples import BadSamplePolicy
from mixflow.data.byte_tokenizer import ByteTokenizer
from mixflow.data.text_domains import (MACHINE_DOMAINS, TextDocument, machine_documents, machine_text_domain,
                                       split_validation)
from mixflow.data.token_shard_writer import (TokenShardWriter, read_manifest, read_text_inputs,
                                             write_domain_splits, write_token_shards)
from mixflow.data.token_source import TokenSource
from mixflow.errors import DataError

TOK = ByteTokenizer()


def random_docs(n: int, seed: int = 0, max_len: int = 90) -> dict[str, np.ndarray]:
    """``n`` documents of random byte tokens, lengths 1..max_len (some shorter, some longer than a sequence)."""
    r = np.random.default_rng(seed)
    return {f"doc{i:04d}": r.integers(0, 256, int(r.integers(1, max_len + 1))) for i in range(n)}


def write_docs(directory: Path, docs: dict[str, np.ndarray], max_docs: int = 7, **kw) -> TokenShardWriter:
    with TokenShardWriter(directory, "syn", max_docs=max_docs, **kw) as writer:
        for doc_id, tokens in docs.items():
            writer.write_tokens(doc_id, tokens)
    return writer


def doc_tokens_by_key(directory: Path) -> dict[str, np.ndarray]:
    """``shard:row`` -> tokens, read straight from the Parquet files."""
    out = {}
    for shard in read_manifest(directory).shards:
        table = pq.read_table(directory / shard.file)
        for row, tokens in enumerate(table.column("tokens").to_pylist()):
            out[f"{Path(shard.file).stem}:{row}"] = np.array(tokens)
    return out


def epoch_pieces(sequences) -> dict[str, list[tuple[int, int, np.ndarray]]]:
    """Per document key, the ``(start, stop, tokens)`` pieces the sequences delivered, in stream order."""
    pieces = defaultdict(list)
    for seq in sequences:
        at = 0
        for span in seq.spans:
            n = span.stop - span.start
            pieces[f"{span.shard}:{span.row}"].append((span.start, span.stop, seq.tokens[at:at + n]))
            at += n
        assert at == seq.num_tokens
    return pieces


@pytest.fixture
def syn(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    docs = random_docs(40)
    write_docs(tmp_path / "syn", docs)
    return tmp_path / "syn", docs


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip_and_special_ids():
    assert TOK.encode("hé") == [104, 195, 169]
    text = "def f(x):\n    return 'naïve ✓ 𝄞'\n"
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode([TOK.eos_id] + ids + [TOK.eos_id, TOK.pad_id]) == text
    assert (TOK.vocab_size, TOK.eos_id, TOK.pad_id) == (258, 256, 257)
    with pytest.raises(ValueError, match="token id 300 is outside the byte vocabulary"):
        TOK.decode([1, 300])


# --------------------------------------------------------------------------- writer and manifest


def test_writer_shards_and_manifest_counts_match_parquet(tmp_path):
    texts = {f"d{i}": "x" * (i + 1) + " ünï\n" * (i % 4) for i in range(23)}
    manifest = write_token_shards([TextDocument(k, v) for k, v in texts.items()], tmp_path, "toy",
                                  max_bytes=4 * 40)
    assert read_manifest(tmp_path) == manifest
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert (raw["tokenizer"], raw["vocab_size"], raw["eos_id"], raw["pad_id"]) == ("bytes", 258, 256, 257)
    assert len(manifest.shards) > 2
    seen = {}
    for shard in manifest.shards:
        table = pq.read_table(tmp_path / shard.file)
        assert table.schema.field("tokens").type == pa.list_(pa.int32())
        tokens = table.column("tokens").to_pylist()
        assert shard.num_docs == table.num_rows and shard.num_tokens == sum(map(len, tokens))
        assert sum(map(len, tokens)) <= 40 or table.num_rows == 1  # the 160-byte target, one doc may exceed it
        seen.update(zip(table.column("doc_id").to_pylist(), tokens))
    assert list(seen) == list(texts)
    assert all(TOK.decode(seen[k]) == v for k, v in texts.items())
    assert raw["num_docs"] == 23 and raw["num_tokens"] == sum(len(v.encode()) for v in texts.values())


def test_writer_takes_any_callable_tokenizer(tmp_path):
    def letters(text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    with pytest.raises(ValueError, match="needs vocab_size= and eos_id="):
        TokenShardWriter(tmp_path, "abc", tokenizer=letters)
    with pytest.raises(ValueError, match=r"eos_id must be in \[0, vocab_size=26\)"):
        TokenShardWriter(tmp_path, "abc", tokenizer=letters, vocab_size=26, eos_id=26)
    with TokenShardWriter(tmp_path, "abc", tokenizer=letters, vocab_size=27, eos_id=26) as w:
        assert w.write("a", "cab") == 3
        with pytest.raises(DataError, match=r"key 'b', offset 1: token id -65 is outside the vocabulary \[0, 27\)"):
            w.write("b", "a b")
        with pytest.raises(ValueError, match="duplicate doc_id 'a'"):
            w.write("a", "abc")
    m = read_manifest(tmp_path)
    assert (m.tokenizer, m.vocab_size, m.eos_id, m.pad_id, m.num_docs) == ("letters", 27, 26, 26, 1)
    assert pq.read_table(tmp_path / m.shards[0].file).column("tokens").to_pylist() == [[2, 0, 1]]


def test_text_inputs_files_glob_jsonl_and_errors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "b.txt").write_text("beta\n")
    (tmp_path / "src" / "a.txt").write_text("alpha\n")
    (tmp_path / "src" / "c.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    docs = read_text_inputs(tmp_path / "src", text_field="body")
    assert [(Path(d.doc_id).name, d.text) for d in docs] == [("a.txt", "alpha\n"), ("b.txt", "beta\n"),
                                                              ("c.jsonl:1", "one"), ("c.jsonl:3", "two")]
    assert [d.text for d in read_text_inputs(str(tmp_path / "src" / "*.txt"))] == ["alpha\n", "beta\n"]

    bad = tmp_path / "bad.jsonl"
    cases = [('{"text": "ok"}\n{"text": "x"\n', "line 2 is not valid JSON"),
             ('{"text": "ok"}\n{"txt": "x"}\n', "line 2 has no field 'text'"),
             ('{"text": "ok"}\n{"text": 3}\n', "line 2: field 'text' must be a string, got int"),
             ('{"text": "ok"}\n{"text": "  "}\n', "line 2: empty text in field 'text'")]
    for content, message in cases:
        bad.write_text(content)
        with pytest.raises(DataError, match=message) as err:
            read_text_inputs(bad)
        assert err.value.shard == str(bad) and err.value.key == f"{bad}:2"
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DataError, match="empty text file"):
        read_text_inputs(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="offset 3: not UTF-8 text"):
        read_text_inputs(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="no input files match"):
        read_text_inputs(str(tmp_path / "nothing*.md"))


# --------------------------------------------------------------------------- packing


def test_packing_delivers_every_token_once_in_order_with_exact_lengths(syn):
    directory, docs = syn
    by_key = doc_tokens_by_key(directory)
    seq_len = 32
    src = TokenSource(directory, seq_len, seed=3, infinite=False)
    seqs = list(src)
    total = sum(len(t) + 1 for t in docs.values())
    assert len(seqs) == -(-total // (seq_len + 1))
    assert all(s.tokens.shape == (seq_len + 1,) and s.inputs.shape == s.targets.shape == (seq_len,) for s in seqs)
    assert all(s.num_tokens == seq_len + 1 for s in seqs[:-1])
    last = seqs[-1]
    assert last.num_tokens == total - (len(seqs) - 1) * (seq_len + 1)
    assert (last.tokens[last.num_tokens:] == TOK.pad_id).all()
    assert last.target_mask.sum() == last.num_tokens - 1
    keys = [s.key for s in seqs]
    assert len(set(keys)) == len(keys)
    assert keys == [f"{s.spans[0].shard}:{s.spans[0].row}:{s.spans[0].start}" for s in seqs]
    pieces = epoch_pieces(seqs)
    assert set(pieces) == set(by_key)
    for key, parts in pieces.items():
        expected = np.append(by_key[key], TOK.eos_id)
        assert [(a, b) for a, b, _ in parts] == list(zip([0] + [b for _, b, _ in parts[:-1]], [b for _, b, _ in parts]))
        assert parts[-1][1] == len(expected)
        np.testing.assert_array_equal(np.concatenate([t for _, _, t in parts]), expected)
    # documents are contiguous in the stream: each one's pieces are consecutive spans
    flat = [f"{sp.shard}:{sp.row}" for s in seqs for sp in s.spans]
    assert len(flat) - sum(1 for a, b in zip(flat, flat[1:]) if a == b) == len(docs)


def doc_order(sequences) -> list[str]:
    return list(dict.fromkeys(f"{sp.shard}:{sp.row}" for s in sequences for sp in s.spans))


def test_same_seed_same_stream_other_epoch_or_seed_other_order(syn):
    directory, _ = syn
    a = TokenSource(directory, 24, seed=5)
    b = TokenSource(directory, 24, seed=5)
    n = 2 * -(-TokenSource(directory, 24, infinite=False).manifest.num_tokens // 25) + 10  # past epoch 1
    sa, sb = [next(a) for _ in range(n)], [next(b) for _ in range(n)]
    assert [s.key for s in sa] == [s.key for s in sb]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(sa, sb))
    assert {s.epoch for s in sa} == {0, 1, 2}
    e0 = doc_order([s for s in sa if s.epoch == 0])
    e1 = doc_order([s for s in sa if s.epoch == 1])
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert doc_order(list(TokenSource(directory, 24, seed=6, infinite=False))) != e0
    assert doc_order(list(TokenSource(directory, 24, seed=5, infinite=False, epoch=1))) == e1


def test_state_dict_round_trip_continues_the_exact_stream(syn):
    directory, _ = syn
    for skip in (0, 1, 37, 61):  # 61: the restored stream crosses an epoch boundary
        src = TokenSource(directory, 20, seed=11)
        for _ in range(skip):
            next(src)
        state = json.loads(json.dumps(src.state_dict()))
        expected = [next(src) for _ in range(50)]
        restored = TokenSource(directory, 20, seed=11)
        restored.load_state_dict(state)
        got = [next(restored) for _ in range(50)]
        assert [s.key for s in got] == [s.key for s in expected]
        assert all(np.array_equal(x.tokens, y.tokens) and x.epoch == y.epoch for x, y in zip(got, expected))
    with pytest.raises(ValueError, match="position must be in"):
        restored.load_state_dict({"epoch": 0, "position": 10**6, "offset": 0})


def test_readers_split_the_documents_disjointly(syn):
    directory, docs = syn
    parts = [doc_order(list(TokenSource(directory, 16, seed=2, reader=r, num_readers=3, infinite=False)))
             for r in range(3)]
    assert sum(map(len, parts)) == len(docs) and len(set().union(*parts)) == len(docs)
    in_order = doc_order(list(TokenSource(directory, 16, shuffle=False, infinite=False)))
    assert in_order == list(doc_tokens_by_key(directory))


# --------------------------------------------------------------------------- bad input


def test_corrupt_and_missing_shards_raise_or_are_quarantined(syn):
    directory, _ = syn
    by_key = doc_tokens_by_key(directory)
    manifest = read_manifest(directory)
    corrupt, missing = manifest.shards[1], manifest.shards[4]
    (directory / corrupt.file).write_bytes(b"PAR1 this is not a parquet file")
    (directory / missing.file).unlink()
    with pytest.raises(DataError) as err:
        list(TokenSource(directory, 16, shuffle=False, infinite=False))
    assert err.value.shard == str(directory / corrupt.file) and err.value.key == "syn-train-000001:0"
    assert "not a readable Parquet token shard" in str(err.value)

    policy = BadSamplePolicy("skip")
    seqs = list(TokenSource(directory, 16, seed=4, infinite=False, policy=policy))
    records = policy.drain()
    bad = {f"syn-train-000001:{r}" for r in range(corrupt.num_docs)} | \
          {f"syn-train-000004:{r}" for r in range(missing.num_docs)}
    assert sorted(r.key for r in records) == sorted(bad) and all(r.epoch == 0 for r in records)
    assert {r.reason for r in records if r.key.startswith("syn-train-000004")} == {"shard file is missing"}
    assert {r.shard for r in records} == {str(directory / corrupt.file), str(directory / missing.file)}
    pieces = epoch_pieces(seqs)
    assert set(pieces) == set(by_key) - bad
    for key, parts in pieces.items():
        np.testing.assert_array_equal(np.concatenate([t for _, _, t in parts]), np.append(by_key[key], TOK.eos_id))


def test_out_of_vocabulary_ids_name_shard_row_and_position(syn):
    directory, _ = syn
    manifest = read_manifest(directory)
    path = directory / manifest.shards[2].file
    rows = pq.read_table(path).to_pylist()
    rows[3]["tokens"] = [5, 6, 300, 7, 258]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    with pytest.raises(DataError, match=r"token id 300 at position 2 is outside the vocabulary \[0, 258\)") as err:
        list(TokenSource(directory, 16, shuffle=False, infinite=False))
    assert err.value.shard == str(path) and err.value.key == "syn-train-000002:3"

    policy = BadSamplePolicy("skip")
    seqs = list(TokenSource(directory, 16, infinite=False, policy=policy))
    assert [r.key for r in policy.records] == ["syn-train-000002:3"]
    assert set(epoch_pieces(seqs)) == set(doc_tokens_by_key(directory)) - {"syn-train-000002:3"}


def test_row_count_disagreeing_with_manifest_and_all_bad_never_hang(syn):
    directory, _ = syn
    path = directory / read_manifest(directory).shards[0].file
    pq.write_table(pq.read_table(path).slice(0, 2), path)
    with pytest.raises(DataError, match="shard has 2 rows but the manifest says 7") as err:
        next(TokenSource(directory, 16, shuffle=False))
    assert err.value.key == "syn-train-000000:0"
    one = directory.parent / "one"
    write_docs(one, {"only": np.array([1, 999])}, vocab_size=1000, eos_id=0)
    raw = json.loads((one / "manifest.json").read_text())
    raw["vocab_size"] = 258
    (one / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="every document of reader 0's epoch was skipped"):
        next(TokenSource(one, 8, policy=BadSamplePolicy("skip")))
    with pytest.raises(DataError, match="cannot read token-shard manifest"):
        TokenSource(directory.parent / "absent", 8)


# --------------------------------------------------------------------------- real text domains


def test_machine_domains_are_deterministic_capped_and_split(tmp_path):
    cap, doc_cap = 48 * 2**10, 8 * 2**10
    for name in MACHINE_DOMAINS:
        first = machine_text_domain(name, max_bytes=cap, max_doc_bytes=doc_cap)
        again = machine_text_domain(name, max_bytes=cap, max_doc_bytes=doc_cap)
        assert first == again
        assert first.train and first.validation, name
        docs = first.train + first.validation
        sizes = [len(d.text.encode()) for d in docs]
        assert sum(sizes) <= cap and max(sizes) <= doc_cap and min(sizes) >= 32
        assert {d.doc_id for d in first.train}.isdisjoint(d.doc_id for d in first.validation)
        assert len(first.validation) == max(1, round(0.1 * len(docs)))
        assert len({d.text for d in docs}) == len(docs)
    python = machine_documents("python", max_bytes=cap, max_doc_bytes=doc_cap)
    assert all(d.doc_id.startswith("stdlib/") and d.doc_id.endswith(".py") for d in python)
    assert any("def " in d.text for d in python)
    assert all(d.doc_id.endswith(".h") for d in machine_documents("c_headers", max_bytes=cap))
    with pytest.raises(ValueError, match="unknown text domain 'poems'; choose one of python, c_headers"):
        machine_documents("poems")


def test_validation_split_depends_on_ids_only():
    docs = [TextDocument(f"d{i}", "text") for i in range(50)]
    train, val = split_validation(docs, 0.2, salt="x")
    train2, val2 = split_validation(docs[::-1], 0.2, salt="x")
    assert len(val) == 10 and {d.doc_id for d in val} == {d.doc_id for d in val2}
    assert [d.doc_id for d in train] == [d.doc_id for d in train2[::-1]]
    assert {d.doc_id for d in split_validation(docs, 0.2, salt="y")[1]} != {d.doc_id for d in val}
    assert split_validation(docs, 0.0) == (docs, [])
    with pytest.raises(DataError, match="cannot be split into non-empty train and validation"):
        split_validation(docs[:1], 0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_validation(docs, 1.0)


def test_domain_splits_feed_a_validation_pass(tmp_path):
    docs = machine_documents("docs", max_bytes=24 * 2**10, max_doc_bytes=4 * 2**10)
    manifests = write_domain_splits(docs, tmp_path, "docs", val_fraction=0.25, max_bytes=16 * 2**10)
    assert manifests["train"].num_docs + manifests["validation"].num_docs == len(docs)
    val = TokenSource(tmp_path / "docs" / "validation", 64, shuffle=False, infinite=False)
    text = TOK.decode(np.concatenate([s.tokens[:s.num_tokens] for s in val]))
    held = split_validation(docs, 0.25, salt="docs")[1]
    assert text == "".join(d.text for d in held)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_token_shards(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(10)))
    assert main(["shards", "--text", f"notes={tmp_path / 'in.jsonl'}", "--jsonl-field", "body",
                 "--out", str(tmp_path / "out"), "--val-fraction", "0.2"]) == 0
    out = tmp_path / "out" / "notes"
    train, val = read_manifest(out / "train"), read_manifest(out / "validation")
    assert (train.num_docs, val.num_docs) == (8, 2)
    assert train.num_tokens + val.num_tokens == sum(len(f"document {i}") for i in range(10))
    assert main(["shards", "--text-domains", "licenses", "--domain-bytes", "16KiB", "--out", str(tmp_path / "m")]) == 0
    assert read_manifest(tmp_path / "m" / "licenses" / "validation").num_docs >= 1
    assert main(["shards", "--text", f"bad={tmp_path / 'none*.txt'}", "--out", str(tmp_path / "x")]) == 2
    assert "no input files match" in capsys.readouterr().out
