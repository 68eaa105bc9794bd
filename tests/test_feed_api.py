"""Your own model and loop: the public feed API (``mixflow.start`` / ``connect`` / ``feed``), the
``trainer.entrypoint`` rank actors, resume through the user's own checkpoint, and every misuse
answered by a named error. The models are defined here, not in mixflow."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import mixflow
from mixflow.config import validate_spec
from tests.conftest import make_spec

EPOCHS = 3


class TinyNet(nn.Module):
    """A small CNN for 24x24 digits: two conv blocks and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def soft_ce(logits, targets):
    return torch.sum(-targets * torch.log_softmax(logits, dim=1), dim=1).mean()


def digest(batch) -> tuple:
    return tuple(batch.keys), zlib.crc32(batch.x.numpy().tobytes())


def train_rank(feed, epochs, stop=None, model=None):
    """One rank's training loop over ``feed``: returns (digests, per-epoch mean loss, targets ok).
    ``stop=(epoch, step)``: leave after ``step`` batches of ``epoch`` (counted from the feed's start).
    A DDP model trains each epoch under ``join()``: ranks get their disjoint shards' batches, so
    their counts may differ by one."""
    torch.manual_seed(0)
    model = model or TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    digests, losses, sums_ok = [], [], True
    first = feed.current_epoch
    for epoch in range(first, epochs):
        total, n = 0.0, 0
        uneven = model.join() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        with uneven:
            for batch in feed.epoch(epoch):
                sums_ok &= bool(torch.allclose(batch.targets.sum(1), torch.ones(len(batch.keys)), atol=1e-5))
                loss = soft_ce(model(batch.x), batch.targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                feed.report(batch.step, loss=loss.item())
                digests.append((epoch, *digest(batch)))
                total, n = total + loss.item(), n + 1
                if stop is not None and (epoch, n) == stop:
                    return digests, losses, sums_ok
        losses.append(total / n)
    return digests, losses, sums_ok


@pytest.fixture(scope="module")
def image_spec(digits_shards, tmp_path_factory):
    return make_spec(digits_shards, tmp_path_factory.mktemp("feed"), trainer={"epochs": EPOCHS},
                     mix={"method": "mixup_cutmix", "mixup_alpha": 0.2, "label_smoothing": 0.1})


@pytest.fixture(scope="module")
def uninterrupted(ray_session, image_spec):
    """Two ranks trained through the public API from one driver, one thread per rank."""
    pipe = mixflow.start(image_spec, name="feed-full")
    out: dict = {}

    def rank(r):
        out[r] = train_rank(pipe.feed(rank=r, world_size=2), EPOCHS)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pipe.close(), out


def test_two_ranks_in_one_driver_train_exactly_once(uninterrupted):
    summary, out = uninterrupted
    assert len(summary.ledgers) == EPOCHS
    for ledger in summary.ledgers:
        assert ledger.exactly_once, ledger.describe()
        assert ledger.delivered == ledger.expected == 1797
    for r in range(2):
        digests, losses, sums_ok = out[r]
        assert sums_ok
        assert losses[-1] < losses[0] - 0.1, losses
        assert summary.ranks[r].epoch_loss == pytest.approx(losses)  # feed.report reaches the summary
        keys = [k for epoch, ks, _ in digests if epoch == 0 for k in ks]
        assert len(keys) == len(set(keys)) == summary.ledgers[0].per_rank[r]


def test_resume_from_the_users_checkpoint_continues_the_identical_stream(ray_session, image_spec, uninterrupted,
                                                                        tmp_path):
    _, full = uninterrupted
    rng = np.random.default_rng(2026)
    cut = (int(rng.integers(0, EPOCHS - 1)), int(rng.integers(1, 25)))
    pipe = mixflow.start(image_spec, name="feed-cut")
    before = {}
    for r in range(2):  # one rank after the other: each rank's channel is its own
        feed = pipe.feed(rank=r, world_size=2)
        before[r] = train_rank(feed, EPOCHS, stop=cut)[0]
        torch.save({"feed": feed.state_dict()}, tmp_path / f"rank{r}.pt")
    first = pipe.close()
    assert [ledger.epoch for ledger in first.ledgers] == list(range(cut[0]))  # no verdict for the cut epoch

    pipe = mixflow.start(image_spec, name="feed-resumed")
    after = {}
    for r in range(2):
        feed = pipe.feed(rank=r, world_size=2)
        feed.load_state_dict(torch.load(tmp_path / f"rank{r}.pt")["feed"])
        assert feed.current_epoch == cut[0]
        after[r] = train_rank(feed, EPOCHS)[0]
    resumed = pipe.close()
    for r in range(2):
        assert before[r] + after[r] == full[r][0], f"rank {r}, cut {cut}"  # keys and pixel crc, batch by batch
    assert [ledger.epoch for ledger in resumed.ledgers] == list(range(cut[0], EPOCHS))
    assert all(ledger.exactly_once for ledger in resumed.ledgers), [lg.describe() for lg in resumed.ledgers]
    assert resumed.ledgers[0].before_resume == 2 * cut[1] * 32


def test_a_mixer_killed_mid_epoch_restarts_and_the_users_stream_is_unchanged(ray_session, image_spec,
                                                                             uninterrupted):
    import ray

    _, full = uninterrupted
    pipe = mixflow.start(image_spec, name="feed-restart")
    feeds = [pipe.feed(rank=r, world_size=2) for r in range(2)]
    first = feeds[0].epoch(0)
    seen = [(0, *digest(next(first))) for _ in range(5)]
    mixer = ray.get(pipe._host.stages.remote())["producers"][0]
    pid = ray.get(mixer.placement.remote())["pid"]
    ray.kill(mixer, no_restart=False)  # Ray restarts it; its run() is retried from the channel's position
    seen += [(0, *digest(b)) for b in first]
    for epoch in range(1, EPOCHS):
        seen += [(epoch, *digest(b)) for b in feeds[0].epoch(epoch)]
    others = [(e, *digest(b)) for e in range(EPOCHS) for b in feeds[1].epoch(e)]
    assert ray.get(mixer.placement.remote())["pid"] != pid  # a new process served the rest
    summary = pipe.close()
    assert seen == full[0][0] and others == full[1][0]  # keys and pixels, batch by batch
    assert summary.exactly_once and len(summary.ledgers) == EPOCHS


class Bigram(nn.Module):
    """Next byte from the current byte: a table of logits."""

    def __init__(self, vocab: int = 260, seed: int = 0):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        # Its own generator: ranks that build their models in concurrent threads would otherwise
        # race on torch's global one (seed, seed, draw, draw), start from different weights, report
        # different losses and so move an adaptive mixture differently from run to run.
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.table(x)


def sequence_loss(model, tokens):
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                       reduction="none")
    return loss.view(tokens.shape[0], -1).mean(1)


def token_rank(feed, stop=None, model=None):
    """A rank's LM loop: per-domain losses reported every step, held-out losses when asked.
    Returns [(step, version, keys, token crc)] and the model."""
    if model is None:
        model = Bigram()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for batch in feed.epoch(0):
        if not batch.empty:
            per_seq = sequence_loss(model, batch.tokens)
            opt.zero_grad()
            per_seq.mean().backward()
            opt.step()
            feed.report(batch.step, per_domain_loss=batch.per_domain(per_seq))
        if batch.eval_after:
            with torch.no_grad():
                held = [sequence_loss(model, torch.from_numpy(v)).mean().item() for v in feed.held_out]
            feed.report_eval(batch.step, held)
        seen.append((batch.step, batch.version, tuple(batch.keys), zlib.crc32(batch.tokens.numpy().tobytes())))
        if stop is not None and batch.step + 1 == stop:
            break
    return seen, model


def _token_spec(root, tmp_path, steps=30):
    return validate_spec({
        "kind": "tokens", "name": "tok", "seed": 3, "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(root), "seq_len": 32, "eval_sequences": 16},
        "mixture": {"policy": "aioli", "params": {"lp_rounds": 1, "lp_steps": 3, "steps_per_round": 5, "eta": 1.0}},
        "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 8}})


def _threads(fn, *args):
    out: dict = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r, *args))) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_token_feed_resumes_the_identical_stream_with_aioli(ray_session, text_domains, tmp_path):
    """Keys, token crc and mixture version of every step: before the cut + after == uninterrupted;
    the reports moved the mixture."""
    spec = _token_spec(text_domains, tmp_path)
    pipe = mixflow.start(spec, name="tok-full")
    full = _threads(lambda r: token_rank(pipe.feed(rank=r, world_size=2))[0])
    summary = pipe.close()
    versions = [v for _, v, _, _ in full[0]]
    assert versions == sorted(versions) and len(set(versions)) > 3  # the mixture moved while training ran
    assert np.abs(np.asarray(summary.trajectory[-1]["p"]) - 1 / 3).sum() > 0.05  # L1 from the start

    cut = int(np.random.default_rng(5).integers(12, 28))
    pipe = mixflow.start(spec, name="tok-cut")
    states, models = {}, {}

    def first_part(r):
        feed = pipe.feed(rank=r, world_size=2)
        seen, models[r] = token_rank(feed, stop=cut)
        states[r] = feed.state_dict()  # a collective: both ranks at step cut - 1
        return seen

    before = _threads(first_part)
    pipe.close()
    assert states[0]["controller"] == states[1]["controller"]
    pipe = mixflow.start(spec, name="tok-resumed")

    def second_part(r):
        feed = pipe.feed(rank=r, world_size=2)
        feed.load_state_dict(states[r])
        return token_rank(feed, model=models[r])[0]

    after = _threads(second_part)
    pipe.close()
    for r in range(2):
        assert [s for s, *_ in before[r]] == list(range(cut))
        assert before[r] + after[r] == full[r], f"rank {r}, cut {cut}"


def train_digits(feed, ctx):
    """A ``trainer.entrypoint``: DDP over the process group mixflow set up, TinyNet, soft-target CE."""
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == ctx.world_size
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(TinyNet())
    _, losses, sums_ok = train_rank(feed, ctx.spec.trainer.epochs, model=model)
    return {"rank": ctx.rank, "losses": losses, "sums_ok": sums_ok}


def test_trainer_entrypoint_runs_the_users_function_on_every_rank(ray_session, digits_shards, tmp_path):
    from mixflow.runtime.image_pipeline import ImagePipeline

    spec = make_spec(digits_shards, tmp_path, trainer={"epochs": 2, "entrypoint": "tests.test_feed_api:train_digits"})
    pipe = ImagePipeline(spec, show_progress=False)
    summary = pipe.run()
    results = pipe.rank_results
    assert summary.exactly_once and [lg.delivered for lg in summary.ledgers] == [1797, 1797]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["sums_ok"] and r["losses"][-1] < r["losses"][0], r


def train_resumable(feed, ctx):
    """A ``trainer.entrypoint`` that registers its model and optimizer for mixflow's run
    checkpoints and loads them back on a resumed run; returns a crc of its final parameters."""
    torch.manual_seed(0)
    model = TinyNet()
    # No momentum: a rank that joins early (one batch fewer) skips that optimizer step, so a
    # stateful optimizer's state differs between the ranks, and leaving ``join()`` at the stop
    # point copies the last rank's parameters over the others' (DDP's final-model sync), which
    # an uninterrupted epoch does not do. Plain SGD keeps the ranks' parameters identical.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if ctx.resume_state is not None:
        model.load_state_dict(ctx.resume_state["model"])
        opt.load_state_dict(ctx.resume_state["optimizer"])
    ctx.on_checkpoint(lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()})
    net = nn.parallel.DistributedDataParallel(model)
    for epoch in range(feed.current_epoch, feed.epochs):
        with net.join():
            for batch in feed.epoch(epoch):
                loss = soft_ce(net(batch.x), batch.targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
    # The parameters, not BatchNorm's running statistics (that final-model sync copies them too).
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return zlib.crc32(weights.numpy().tobytes())


def test_mixflow_run_stops_and_resumes_a_users_entrypoint_exactly(ray_session, digits_shards, tmp_path):
    """``run(stop_at=...)`` (``mixflow run --stop-at``) at a seeded random cut, then a run resumed
    from its state: the stream after the cut and the final weights equal an uninterrupted run's."""
    from mixflow.runtime.image_pipeline import ImagePipeline

    def spec(sub):
        return make_spec(digits_shards, tmp_path / sub, trainer={"epochs": 2,
                                                                 "entrypoint": "tests.test_feed_api:train_resumable"})

    full = ImagePipeline(spec("full"), show_progress=False, record_digests=True)
    assert full.run().exactly_once
    cut = (int(np.random.default_rng(5).integers(0, 2)), int(np.random.default_rng(6).integers(1, 28)))
    first = ImagePipeline(spec("cut"), show_progress=False, record_digests=True)
    first.run(stop_at=cut)
    second = ImagePipeline(spec("cut"), show_progress=False, record_digests=True,
                           resume_from=spec("cut").run_path / "pipeline_state.json")
    summary = second.run()
    assert summary.exactly_once and [lg.epoch for lg in summary.ledgers] == list(range(cut[0], 2))
    for r in range(2):
        assert first.digests[r] + second.digests[r] == full.digests[r], f"rank {r}, cut {cut}"
    assert second.rank_results == full.rank_results  # the same final weights ...
    assert len(set(full.rank_results)) == 1  # ... on both ranks


def entrypoint_leaving_early(feed, ctx):
    for batch in feed.epoch(0):
        break


def test_an_entrypoint_that_leaves_an_epoch_unfinished_is_named(ray_session, digits_shards, tmp_path):
    from mixflow.runtime.image_pipeline import ImagePipeline

    spec = make_spec(digits_shards, tmp_path, trainer={"entrypoint": "tests.test_feed_api:entrypoint_leaving_early"})
    with pytest.raises(mixflow.PipelineError, match=r"trainer r0: tests.test_feed_api:entrypoint_leaving_early "
                                                    r"returned before its feed finished epoch 0"):
        ImagePipeline(spec, show_progress=False).run()


def failing_entrypoint(feed, ctx):
    if ctx.rank == 1:
        raise RuntimeError("my loop broke")
    for _ in feed.epoch(0):
        time.sleep(0.05)


def test_an_entrypoint_that_raises_is_named(ray_session, digits_shards, tmp_path):
    from mixflow.runtime.image_pipeline import ImagePipeline

    spec = make_spec(digits_shards, tmp_path, trainer={"entrypoint": "tests.test_feed_api:failing_entrypoint"})
    with pytest.raises(mixflow.PipelineError, match=r"(?s)trainer r1 failed: .*RuntimeError: my loop broke"):
        ImagePipeline(spec, show_progress=False).run()


# --- misuse: each answered by a named error ---------------------------------------------------------


@pytest.fixture(scope="module")
def misuse_pipe(ray_session, digits_shards, tmp_path_factory):
    pipe = mixflow.start(make_spec(digits_shards, tmp_path_factory.mktemp("misuse")), name="misuse")
    yield pipe
    pipe.close()


def test_unknown_pipeline_name(misuse_pipe):
    with pytest.raises(mixflow.PipelineNotFoundError, match=r"no running pipeline named 'nope'; running: .*misuse"):
        mixflow.connect("nope")


def test_wrong_world_size_and_rank(misuse_pipe):
    with pytest.raises(mixflow.WorldSizeError, match=r"started with trainer.ranks=2; this feed asked for world_size=3"):
        misuse_pipe.feed(rank=0, world_size=3)
    with pytest.raises(mixflow.WorldSizeError, match=r"has ranks 0..1; this feed asked for rank 2"):
        misuse_pipe.feed(rank=2, world_size=2)


def test_no_rank_outside_ray_train_or_torchrun(misuse_pipe, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(mixflow.WorldSizeError, match=r"no rank given and none found"):
        misuse_pipe.feed()


def test_second_consumer_for_one_rank_is_refused_until_the_first_lets_go(misuse_pipe, ray_session):
    first = misuse_pipe.feed(rank=0, world_size=2)
    with pytest.raises(mixflow.RankInUseError, match=r"rank 0 of pipeline 'misuse' already has a consumer \(pid "):
        misuse_pipe.feed(rank=0, world_size=2)
    first.close()
    misuse_pipe.feed(rank=0, world_size=2).close()
    # A consumer whose process ended is replaced: a worker restarted after a crash takes its rank over.
    address = ray_session.get_runtime_context().gcs_address
    code = ("import mixflow; f = mixflow.connect('misuse').feed(rank=1, world_size=2); "
            "print('claimed', f.rank)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": address})
    assert "claimed 1" in proc.stdout, proc.stderr[-2000:]
    deadline = time.monotonic() + 30
    while True:
        try:
            misuse_pipe.feed(rank=1, world_size=2).close()
            break
        except mixflow.RankInUseError:
            assert time.monotonic() < deadline, "the ended process kept its claim"
            time.sleep(0.5)


def test_epochs_out_of_order(misuse_pipe):
    feed = misuse_pipe.feed(rank=0, world_size=2)
    with pytest.raises(mixflow.EpochOrderError, match=r"epoch\(1\) is outside the pipeline's epochs 0..0"):
        feed.epoch(1)
    for _ in zip(range(3), feed.epoch(0)):
        pass
    with pytest.raises(mixflow.EpochOrderError, match=r"epoch\(1\) is outside"):
        feed.epoch(1)  # epoch 0 is in progress
    rest = list(feed.epoch(0))  # an epoch left early goes on where it was left
    assert len(rest) == 29 - 3
    with pytest.raises(mixflow.EpochOrderError, match=r"has consumed all 1 epoch\(s\)"):
        feed.epoch(0)
    feed.close()


def test_bad_feed_state_is_named(misuse_pipe):
    feed = misuse_pipe.feed(rank=0, world_size=2)
    state = feed.state_dict()
    other = {**state, "rank": 1}
    with pytest.raises(mixflow.FeedStateError, match=r"saved by rank 1 of 2; load each rank's own state"):
        feed.load_state_dict(other)
    changed = {**state, "stream": {**state["stream"], "seed": 99}}
    with pytest.raises(mixflow.FeedStateError, match=r"different stream; differing fields: seed \(state: 99, spec: 7\)"):
        feed.load_state_dict(changed)
    hostile = {**state, "position": {**state["position"], "starts": [-50]}}
    with pytest.raises(mixflow.FeedStateError, match=r"rank 0 of pipeline 'misuse': load_state_dict: "
                                                     r"position.starts\[0\]: -50 is outside"):
        feed.load_state_dict(hostile)
    past = {**state, "position": {**state["position"], "step": 999}}
    with pytest.raises(mixflow.FeedStateError, match=r"position.step: 999 does not follow from cursor 0"):
        feed.load_state_dict(past)
    with pytest.raises(mixflow.FeedStateError, match=r"skipped\[0\]: must be a quarantine record"):
        feed.load_state_dict({**state, "skipped": ["x"]})
    feed.close()


def test_a_rank_that_never_connects_fails_the_pipeline_by_name(ray_session, digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, runtime={"connect_timeout": 3})
    pipe = mixflow.start(spec, name="lonely")
    feed = pipe.feed(rank=0, world_size=2)
    time.sleep(4)
    with pytest.raises(mixflow.RankNotConnectedError, match=r"rank\(s\) 1 of 2 never connected within 3 s"):
        list(feed.epoch(0))
    with pytest.raises(mixflow.RankNotConnectedError, match="never connected"):
        pipe.close()


def test_a_dead_stage_is_named_in_the_users_loop(ray_session, digits_shards, tmp_path):
    import ray

    pipe = mixflow.start(make_spec(digits_shards, tmp_path, trainer={"epochs": 2}), name="dies")
    feeds = [pipe.feed(rank=r, world_size=2) for r in range(2)]
    it = feeds[0].epoch(0)
    next(it)
    mixer = ray.get(pipe._host.stages.remote())["producers"][0]
    ray.kill(mixer, no_restart=True)
    with pytest.raises(mixflow.PipelineError, match=r"mixer r0 died"):
        for _ in it:
            pass
    with pytest.raises(mixflow.PipelineError, match=r"mixer r0 died"):
        list(feeds[1].epoch(0))  # every rank hears it, none hangs
    with pytest.raises(mixflow.PipelineError, match=r"mixer r0 died"):
        pipe.close()


def test_feed_normalises_uint8_into_recycled_buffers_without_touching_kept_batches():
    from mixflow.train.feed import Feed

    feed = Feed(None)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (64, 96, 96, 3), dtype=torch.uint8, generator=g)  # 7 MB of float: pooled
    reference = first.permute(0, 3, 1, 2).float().div(255.0).sub(feed.mean).div(feed.std)
    kept = feed._normalise(first)
    assert kept.is_contiguous() and kept.shape == (64, 3, 96, 96)
    assert torch.allclose(kept, reference, atol=1e-6, rtol=0)
    second = feed._normalise(torch.zeros_like(first))
    assert second.data_ptr() != kept.data_ptr() and torch.allclose(kept, reference, atol=1e-6, rtol=0)
    pointer = second.data_ptr()
    del second
    assert feed._normalise(first).data_ptr() == pointer  # a dropped batch's buffer is handed out again
