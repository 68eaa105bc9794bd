"""Shards in object storage: the pipelines read from a real local S3 endpoint (moto's server on
127.0.0.1), reached as a user would: ``data.storage_options`` names the endpoint, the standard
AWS variables hold the (dummy) credentials."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from mixflow.data.object_store import ShardCache
from mixflow.runtime.image_pipeline import ImagePipeline
from tests.conftest import make_spec

BUCKET = "mixflow-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    fs = s3(url)
    fs.mkdir(BUCKET)
    yield url
    server.stop()


def s3(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def upload(endpoint: str, local: Path, prefix: str) -> str:
    """Every file under ``local`` to ``s3://BUCKET/prefix/`` (same relative paths); the URL."""
    fs = s3(endpoint)
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{BUCKET}/{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def digits_url(s3_endpoint, digits_shards):
    return upload(s3_endpoint, digits_shards, "digits")


def remote_data(url: str, endpoint: str, cache: Path, **more) -> dict:
    return {"shards": url, "num_classes": 10, "cache_dir": str(cache),
            "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}, **more}


class CacheWatch:
    """Samples the bytes a shard cache holds, every few milliseconds, while a run goes on."""

    def __init__(self, cache_dir: Path, limit: int):
        self.cache = ShardCache(cache_dir, limit)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.cache.held())
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def local_stream(ray_session, digits_shards, tmp_path_factory):
    spec = make_spec(digits_shards, tmp_path_factory.mktemp("local"), trainer={"epochs": 2})
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    assert pipe.run().exactly_once
    return pipe.digests


def test_image_pipeline_from_s3_gives_the_local_stream_within_the_cache_limit(
        ray_session, s3_endpoint, digits_url, digits_shards, local_stream, tmp_path):
    sizes = [p.stat().st_size for p in Path(digits_shards).glob("*.tar")]
    limit = 3 * max(sizes)  # far less than the data set: shards are evicted and fetched again
    assert limit < sum(sizes) / 2
    cache = tmp_path / "cache"
    spec = make_spec(digits_url, tmp_path, trainer={"epochs": 2},
                     data=remote_data(digits_url, s3_endpoint, cache, cache_limit=limit))
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    with CacheWatch(cache, limit) as watch:
        summary = pipe.run()
    for ledger in summary.ledgers:
        assert ledger.exactly_once and ledger.delivered == 1797, ledger.describe()
    assert pipe.digests == local_stream  # keys, pixel CRC and soft-target CRC, batch by batch, both epochs
    assert 0 < watch.peak <= limit
    store = summary.store
    assert store["downloads"] >= len(sizes) and store["evictions"] > 0 and store["retries"] == 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["store"]["downloads"] == store["downloads"]
    assert "mixflow-test-secret" not in json.dumps(saved) and "mixflow-test-key" not in json.dumps(saved)


# --- a missing object: on_error decides ------------------------------------------------------


@pytest.fixture()
def small_url(s3_endpoint, digits_shards, request):
    """Four digits shards (with indexes and classes.json) under a prefix of their own."""
    local = sorted(Path(digits_shards).glob("*.tar"))[:4]
    fs = s3(s3_endpoint)
    prefix = f"{BUCKET}/small-{request.node.name[-40:]}"
    for tar in local:
        fs.put_file(str(tar), f"{prefix}/{tar.name}")
        fs.put_file(str(tar.with_suffix(".idx")), f"{prefix}/{tar.stem}.idx")
    return f"s3://{prefix}", [t.name for t in local]


def _stage(shards, on_error: str):
    from mixflow.config import DecodeSpec
    from mixflow.decode.decode_stage import DecodeStage

    return DecodeStage(shards, 0, 1, DecodeSpec(size=(24, 24)), 32, 10, seed=3, on_error=on_error)


def _listed(url: str, endpoint: str, cache: Path, on_error: str = "raise"):
    from mixflow.config import validate_spec
    from mixflow.data.bad_samples import BadSamplePolicy
    from mixflow.data.listing import list_shards

    data = validate_spec({"name": "t", "data": remote_data(url, endpoint, cache),
                          "trainer": {"model": "none"}}).data
    policy = BadSamplePolicy(on_error)
    return list_shards(url, policy, data.store), policy


def test_object_deleted_after_listing_raise_names_its_url(s3_endpoint, small_url, tmp_path):
    from mixflow.errors import DataError

    url, names = small_url
    shards, _ = _listed(url, s3_endpoint, tmp_path / "cache")
    s3(s3_endpoint).rm_file(f"{url[5:]}/{names[1]}")
    stage = _stage(shards, "raise")
    with pytest.raises(DataError) as err:
        while stage.next_batch() is not None:
            pass
    assert err.value.shard == f"{url}/{names[1]}" and err.value.key
    assert "object does not exist" in str(err.value) and f"{url}/{names[1]}" in str(err.value)


def test_object_deleted_after_listing_skip_quarantines_each_sample(s3_endpoint, small_url, tmp_path):
    from mixflow.data.tar_index import read_index

    url, names = small_url
    shards, _ = _listed(url, s3_endpoint, tmp_path / "cache")
    gone = shards[1]
    lost = {s.key for s in read_index(gone.index_path)}
    every = {s.key for info in shards for s in read_index(info.index_path)}
    s3(s3_endpoint).rm_file(f"{url[5:]}/{names[1]}")
    stage, delivered, records = _stage(shards, "skip"), [], []
    while (batch := stage.next_batch()) is not None:
        delivered += batch["keys"]
        records += batch["skipped"]
    records += stage.policy.drain()
    assert sorted(r.key for r in records) == sorted(lost)  # one record per sample, counted
    assert {r.shard for r in records} == {f"{url}/{names[1]}"}
    assert sorted(delivered) == sorted(every - lost)  # nothing else lost, nothing twice


def test_listing_a_tar_gone_but_its_index_present(s3_endpoint, small_url, tmp_path):
    from mixflow.errors import DataError

    url, names = small_url
    s3(s3_endpoint).rm_file(f"{url[5:]}/{names[2]}")
    with pytest.raises(DataError, match=f"shard {url}/{names[2]}.*shard object is missing"):
        _listed(url, s3_endpoint, tmp_path / "c1")
    shards, policy = _listed(url, s3_endpoint, tmp_path / "c2", "skip")
    assert len(shards) == 3 and len(policy.records) > 0
    assert {r.shard for r in policy.records} == {f"{url}/{names[2]}"} and all(r.key for r in policy.records)


def test_credentials_stay_out_of_options_and_errors(s3_endpoint, tmp_path):
    from mixflow.config import validate_spec
    from mixflow.data.object_store import redact
    from mixflow.errors import ConfigError

    with pytest.raises(ConfigError, match="data.storage_options.*must not hold credentials"):
        validate_spec({"name": "t", "data": {"shards": "s3://b/p", "num_classes": 10,
                                             "storage_options": {"secret": "x"}}, "trainer": {"model": "none"}})
    assert redact("https://user:pw@host:9000/b/p.tar?X-Amz-Signature=abc") == "https://host:9000/b/p.tar"


# --- the token pipeline from the bucket ------------------------------------------------------


def _token_stream(summary):
    """Per rank: (step, version, keys, crc of the tokens) of every consumed batch."""
    return [[(b["step"], b["version"], tuple(b["keys"]), b["crc"]) for b in rank] for rank in summary.batches]


def _token_spec(shards, run_dir, steps, **data):
    """A small stratified token run (unigram model, 2 ranks) over ``shards``; ``data`` adds fields."""
    from mixflow.config import validate_spec

    return validate_spec({
        "kind": "tokens", "name": "tok", "seed": 3, "run_dir": str(run_dir),
        "data": {"shards": shards, "seq_len": 32, "eval_sequences": 8, **data},
        "mixture": {"policy": "stratified"}, "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 8, "model": "unigram", "eval_every": 0}})


def test_token_pipeline_from_s3_gives_the_local_stream(ray_session, s3_endpoint, text_domains, tmp_path):
    """The same token stream from the bucket as from local disk, with every shard download going
    through the faulty proxy (parquet GETs answered 500 or cut mid-body); the summary counts the
    downloads, cache hits and the retries the faults caused, printed and in summary.json."""
    from rich.console import Console

    from mixflow.runtime.token_pipeline import TokenPipeline

    url = upload(s3_endpoint, text_domains, "text")

    local = TokenPipeline(_token_spec(str(text_domains), tmp_path / "local", 12), show_progress=False).run()
    with FaultyProxy(s3_endpoint, every=4, match=".parquet") as proxy:
        remote = TokenPipeline(_token_spec(url, tmp_path / "remote", 12, cache_dir=str(tmp_path / "cache"),
                                    storage_options={"client_kwargs": {"endpoint_url": proxy.url}}),
                               show_progress=False).run()
    assert remote.domains == local.domains == sorted(p.name for p in Path(text_domains).iterdir())
    assert _token_stream(remote) == _token_stream(local)  # key for key, token crc for crc
    assert remote.skipped == local.skipped == 0
    assert remote.test_loss == local.test_loss  # the held-out sets came from the bucket too
    cached = list((tmp_path / "cache" / "shards").glob("*.parquet"))
    assert cached
    assert local.store == {}
    store = remote.store
    # Each cached shard was downloaded once (the driver's held-out sets and the producers share the
    # cache directory: a shard one of them fetched is a cache hit for the others).
    assert store["downloads"] == len(cached) and store["evictions"] == 0
    assert store["bytes_downloaded"] == sum(p.stat().st_size for p in cached)
    assert proxy.faults["500"] > 0 and proxy.faults["cut"] > 0
    assert 0 < store["retries"] <= proxy.faults["500"] + proxy.faults["cut"]
    saved = json.loads((tmp_path / "remote" / "summary.json").read_text())
    assert saved["store"] == store
    console = Console(record=True, width=200)
    remote.render(console)
    printed = console.export_text()
    assert f"{store['downloads']} shard downloads" in printed and f"{store['retries']} requests retried" in printed


def test_token_pipeline_resumed_from_the_bucket_continues_the_exact_stream(ray_session, s3_endpoint, text_domains,
                                                                           tmp_path):
    """A token run reading from the bucket, stopped after step 5 and resumed from its checkpoint:
    before + after is the uninterrupted stream, batch for batch; the resumed run finds every shard
    in the cache (no download) and the stopped run's summary still counts its producers' downloads."""
    import torch

    from mixflow.runtime.token_pipeline import TokenPipeline

    url = upload(s3_endpoint, text_domains, "text-resume")

    def remote(sub):
        return _token_spec(url, tmp_path / sub, 10, cache_dir=str(tmp_path / "cache"),
                           storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})

    whole = _token_stream(TokenPipeline(_token_spec(str(text_domains), tmp_path / "whole", 10),
                                        show_progress=False).run())
    first = TokenPipeline(remote("a"), show_progress=False)
    stopped = first.run(stop_after=5)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = TokenPipeline(remote("b"), show_progress=False, resume_from=state).run()
    before, after = _token_stream(stopped), _token_stream(resumed)
    for rank in range(2):
        assert [b[0] for b in before[rank]] == list(range(5))
        assert before[rank] + after[rank] == whole[rank], f"rank {rank}"
    assert stopped.store["downloads"] > 0
    assert resumed.store["downloads"] == 0 and resumed.store["cache_hits"] > 0


# --- transient faults: a proxy in front of the endpoint ---------------------------------------


class FaultyProxy:
    """An HTTP proxy to the S3 endpoint that fails some ranged GETs of objects whose path holds
    ``match`` (``.tar`` shards by default): every ``every``-th one answers 500, the one after it
    sends its headers and half its body, then closes the connection (a read cut mid-object).
    Everything else passes through."""

    def __init__(self, endpoint: str, every: int = 4, match: str = ".tar"):
        import http.client
        import http.server
        from urllib.parse import urlsplit

        target = urlsplit(endpoint)
        self.every, self.count, self.faults, self.match = every, 0, {"500": 0, "cut": 0}, match
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = None
                if self.command == "GET" and proxy.match in self.path and "Range" in self.headers:
                    with lock:
                        proxy.count += 1
                        turn = proxy.count % proxy.every
                        fault = "500" if turn == 0 else "cut" if turn == 1 and proxy.count > 1 else None
                        if fault:
                            proxy.faults[fault] += 1
                if fault == "500":
                    error = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body, dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_faults_are_retried_and_counted_and_resume_from_the_bucket_continues_the_stream(
        ray_session, s3_endpoint, digits_url, local_stream, tmp_path):
    """Through the faulty proxy: a run stopped mid-epoch 0, then resumed from its checkpoint; the two
    together are the uninterrupted local stream (keys, pixels, targets), exactly once, and the
    retries of the injected faults are in the summaries."""
    with FaultyProxy(s3_endpoint, every=4) as proxy:
        def spec():
            return make_spec(digits_url, tmp_path, trainer={"epochs": 2},
                             data=remote_data(digits_url, proxy.url, tmp_path / "cache", cache_limit="1MiB"))

        first = ImagePipeline(spec(), show_progress=False, record_digests=True)
        stopped = first.run(stop_at=(0, 11))
        second = ImagePipeline(spec(), show_progress=False, record_digests=True,
                               resume_from=spec().run_path / "pipeline_state.json")
        resumed = second.run()
    assert proxy.faults["500"] > 0 and proxy.faults["cut"] > 0
    for r in range(2):
        assert first.digests[r] + second.digests[r] == local_stream[r], f"rank {r}"
    assert resumed.exactly_once and [lg.epoch for lg in resumed.ledgers] == [0, 1]
    retries = stopped.store["retries"] + resumed.store["retries"]
    # Counted: the retries mixflow made. Not every injected fault reaches it (a run saw 75 retries for
    # 142 faults): the client library re-sends some requests itself before answering.
    assert 0 < retries <= proxy.faults["500"] + proxy.faults["cut"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["store"]["retries"] == resumed.store["retries"]
    assert "mixflow-test-secret" not in json.dumps(saved) and "mixflow-test-key" not in json.dumps(saved)


# --- mixflow shards --out s3://... -------------------------------------------------------------


def test_shards_command_writes_image_and_token_shards_to_the_bucket(s3_endpoint, tmp_path):
    from mixflow.cli import main
    from mixflow.data.listing import list_shards
    from mixflow.data.token_source import TokenSource
    from mixflow.data.object_store import RemoteDir

    options = json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})
    url = f"s3://{BUCKET}/written/digits"
    assert main(["shards", "--demo", "digits", "--shard-size", "256KiB", "--out", url,
                 "--storage-options", options]) == 0
    names = {Path(p).name for p in s3(s3_endpoint).ls(url[5:])}
    assert "classes.json" in names and {n[:-4] for n in names if n.endswith(".tar")} == \
        {n[:-4] for n in names if n.endswith(".idx")}
    data = remote_data(url, s3_endpoint, tmp_path / "cache")
    from mixflow.config import validate_spec

    store = validate_spec({"name": "t", "data": data, "trainer": {"model": "none"}}).data.store
    assert sum(s.num_samples for s in list_shards(url, store=store)) == 1797

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 200)
    text_url = f"s3://{BUCKET}/written/text"
    assert main(["shards", "--text", f"notes={docs}", "--out", text_url, "--val-fraction", "0.2",
                 "--storage-options", options]) == 0
    local = tmp_path / "local-text"
    assert main(["shards", "--text", f"notes={docs}", "--out", str(local), "--val-fraction", "0.2"]) == 0
    remote = TokenSource(RemoteDir(f"{text_url}/notes/train", store), 16, infinite=False)
    here = TokenSource(local / "notes" / "train", 16, infinite=False)
    assert [(s.key, s.tokens.tolist()) for s in remote] == [(s.key, s.tokens.tolist()) for s in here]
