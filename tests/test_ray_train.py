"""mixflow feeds inside Ray Train: ``TorchTrainer`` workers (DDP on gloo) call ``mixflow.feed(name)``.

Ray 2.60 runs Train V2: ``ScalingConfig(trainer_resources=...)`` and
``TorchTrainer(resume_from_checkpoint=...)`` raise ``DeprecationWarning``. The controller actor
takes no CPU, so ``resources_per_worker={"CPU": 0.01}`` is all it takes for two workers to fit
beside the pipeline's actors (which take none) on a 2-core machine. A run resumes by fitting a
trainer with the same ``RunConfig(name, storage_path)``: its checkpoint manager snapshot names the
latest checkpoint, which ``ray.train.get_checkpoint()`` hands every worker. Each worker writes
its own ``rank{r}.pt`` into its own temporary directory; ``ray.train.report`` uploads them all into
one checkpoint directory (the name is synced from rank 0).

Per-rank records come back through rank 0's ``return_value`` (``torch.distributed.all_gather_object``;
tensors are refused there, so weights travel as numpy), per-rank metrics through a ``UserCallback``.

DDP and the feeds' uneven split (29 and 28 batches of an epoch) need ``model.join()``; the rank
that runs out first skips the epoch's last optimizer step, so its optimizer state lags for good
and mid-epoch its weights differ from rank 0's (join() re-syncs the weights as the ranks leave it).
An exact mid-epoch resume therefore captures each rank's state inside join() and rebuilds DDP
with ``init_sync=False`` (no broadcast of rank 0's weights).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from ray.train import UserCallback

from tests.conftest import make_spec

DIGITS = 1797
WORKER = {"CPU": 0.01}


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x):
        return self.body(x)


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


class MetricsLog(UserCallback):
    """Runs in the Train controller actor, not here: appends every ``ray.train.report`` round (the
    metrics of all workers, in rank order) to a JSON-lines file. Train V2's ``Result.metrics`` holds
    only the metrics rank 0 reported with the latest checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint is not None}) + "\n")


def _reports(path) -> list[dict]:
    import json

    return [json.loads(line) for line in open(path)] if path.exists() else []


def _trainer(loop, config: dict, storage, name: str, log=None):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(loop, train_loop_config=config,
                        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker=WORKER),
                        run_config=RunConfig(name=name, storage_path=str(storage),
                                             callbacks=[MetricsLog(log)] if log else None))


def _gather(record):
    """Every rank's ``record``, in rank order (returned by rank 0 as the run's return_value)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, record)
    return out


# --- image ---------------------------------------------------------------------------------------

def image_loop(config: dict):
    """Train SmallCNN (DDP) on the feed of pipeline ``config["name"]``; record every batch.

    ``config["cut"]``: ``[epoch, step]``: after the batch of that epoch step, checkpoint
    ``{"model", "optimizer", "feed"}`` as ``rank{r}.pt`` and stop. A run that finds a
    checkpoint (``ray.train.get_checkpoint()``) loads it first and continues."""
    import copy
    import os
    import tempfile

    import ray.train
    import ray.train.torch

    import mixflow

    rank = ray.train.get_context().get_world_rank()
    feed = mixflow.feed(config["name"])
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer_state, start_epoch, resumed_from = None, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as where:
            state = torch.load(os.path.join(where, f"rank{rank}.pt"), weights_only=False)
            resumed_from = sorted(os.listdir(where))
        model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        feed.load_state_dict(state["feed"])
        start_epoch = feed.current_epoch
    # Resuming: keep each rank's own weights (no broadcast of rank 0's at DDP construction). They
    # differ mid-epoch: a rank with fewer batches (28 vs 29 an epoch) sits out DDP's last step of
    # the epoch under join(), so its optimizer state lags one step for good, and its weights drift
    # from rank 0's between the syncs join() does when the ranks leave it.
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"init_sync": False} if checkpoint is not None else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.get("lr", 5e-3))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    cut = tuple(config["cut"]) if config.get("cut") else None
    batches, epochs, stopped, step_losses = [], [], False, []
    for epoch in range(start_epoch, feed.epochs):
        losses, targets_ok, count = [], True, 0
        with model.join():  # ranks get ceil/floor of the epoch's batches: DDP needs join
            for batch in feed.epoch(epoch):
                batches.append({"epoch": epoch, "step": batch.step, "keys": list(batch.keys),
                                "crc": zlib.crc32(batch.x.numpy().tobytes()),
                                "targets_crc": zlib.crc32(batch.targets.numpy().tobytes())})
                ones = torch.ones(len(batch.keys), dtype=batch.targets.dtype)
                targets_ok &= bool(torch.allclose(batch.targets.sum(1), ones, atol=1e-5))
                targets_ok &= batch.targets.shape == (len(batch.keys), 10)
                loss = soft_ce(model(batch.x), batch.targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                feed.report(batch.step, loss=loss.item())
                losses.append(loss.item())
                step_losses.append(loss.item())
                count += 1
                if cut == (epoch, count):
                    # Capture this rank's state here, inside join(): leaving it syncs every rank to
                    # the weights of one rank (see the resume test), which would not be this rank's.
                    saved = copy.deepcopy({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                                           "feed": feed.state_dict()})
                    stopped = True
                    break
        epochs.append({"epoch": epoch, "mean_loss": float(np.mean(losses)), "targets_ok": targets_ok,
                       "batches": count})
        metrics = {"rank": rank, "epoch": epoch, "mean_loss": float(np.mean(losses)), "targets_ok": targets_ok}
        if stopped:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(saved, os.path.join(tmp, f"rank{rank}.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            break
        ray.train.report(metrics)
    feed.close()
    weights = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    params = [k for k, _ in model.module.named_parameters()]
    return _gather({"rank": rank, "batches": batches, "epochs": epochs, "resumed_from": resumed_from,
                    "weights": weights, "params": params,
                    "step_losses": step_losses})


def _stream_diff(got: list[dict], want: list[dict]) -> str:
    """Where two batch streams part: which batches, and in what (keys, pixels, targets)."""
    parts = [f"{len(got)} vs {len(want)} batches"]
    for i, (g, w) in enumerate(zip(got, want)):
        fields = [k for k in ("epoch", "step", "keys", "crc", "targets_crc") if g[k] != w[k]]
        if fields:
            parts.append(f"#{i} (epoch {w['epoch']} step {w['step']}): {', '.join(fields)}")
    return "; ".join(parts[:12])


@pytest.fixture(scope="module")
def image_run(ray_session, digits_shards, tmp_path_factory):
    """One uninterrupted 2-epoch TorchTrainer run (run A): its summary, result and per-rank records."""
    import mixflow

    tmp = tmp_path_factory.mktemp("ray_train_image")
    spec = make_spec(digits_shards, tmp, trainer={"epochs": 2})
    pipe = mixflow.start(spec, name="rt_full")
    try:
        result = _trainer(image_loop, {"name": "rt_full"}, tmp / "train", "full", tmp / "reports.jsonl").fit()
    finally:
        summary = pipe.close()
    return {"spec": spec, "summary": summary, "result": result, "records": result.return_value, "tmp": tmp,
            "reports": _reports(tmp / "reports.jsonl")}


def test_image_ddp_training_under_torch_trainer(image_run):
    summary, result, records = image_run["summary"], image_run["result"], image_run["records"]
    assert result.error is None
    assert summary.exactly_once
    assert [led.epoch for led in summary.ledgers] == [0, 1]
    for led in summary.ledgers:
        assert led.exactly_once, led.describe()
        assert led.delivered == led.expected == DIGITS, led.describe()
    # targets are distributions in every batch of every rank, as each worker reported per epoch
    reports = image_run["reports"]
    assert [[m["epoch"] for m in r["metrics"]] for r in reports] == [[0, 0], [1, 1]]
    assert [[m["rank"] for m in r["metrics"]] for r in reports] == [[0, 1], [0, 1]]
    assert all(m["targets_ok"] is True for r in reports for m in r["metrics"])
    assert result.metrics is None and result.checkpoint is None  # nothing was checkpointed
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert [e["targets_ok"] for e in r["epochs"]] == [True, True]
    # every sample once per epoch, split between the two ranks: 57 batches of <= 32
    for epoch in (0, 1):
        keys = [k for r in records for b in r["batches"] if b["epoch"] == epoch for k in b["keys"]]
        assert len(keys) == len(set(keys)) == DIGITS
        assert sorted(len([b for b in r["batches"] if b["epoch"] == epoch]) for r in records) == [28, 29]
    # the two epochs are different permutations
    first = [b["keys"] for b in records[0]["batches"] if b["epoch"] == 0]
    second = [b["keys"] for b in records[0]["batches"] if b["epoch"] == 1]
    assert first != second
    # the model learns: mean loss of epoch 1 below epoch 0 on every rank (summary and worker agree)
    for rank, rec in enumerate(records):
        losses = summary.ranks[rank].epoch_loss
        assert len(losses) == 2
        np.testing.assert_allclose(losses, [e["mean_loss"] for e in rec["epochs"]], rtol=1e-9)
        assert losses[1] < losses[0], losses
        assert [r["metrics"][rank]["mean_loss"] for r in reports] == pytest.approx(losses)
    # DDP kept the replicas' parameters identical
    for k in records[0]["params"]:
        np.testing.assert_array_equal(records[0]["weights"][k], records[1]["weights"][k])


def test_resume_through_ray_train_checkpoint_continues_identical_stream(image_run):
    import os

    import mixflow

    tmp, spec, whole = image_run["tmp"], image_run["spec"], image_run["records"]
    rng = np.random.default_rng(20261202)
    cut = [int(rng.integers(0, 2)), int(rng.integers(1, 28))]  # every rank has >= 28 batches an epoch

    # run B: stops after the cut step, checkpointing each rank's feed state + model
    pipe_b = mixflow.start(spec, name="rt_cut")
    try:
        result_b = _trainer(image_loop, {"name": "rt_cut", "cut": cut}, tmp / "train", "resumed").fit()
    finally:
        summary_b = pipe_b.close()
    assert result_b.error is None
    before = result_b.return_value
    # both workers' files were merged into the one checkpoint directory
    assert sorted(os.listdir(result_b.checkpoint.path)) == ["rank0.pt", "rank1.pt"]
    assert result_b.metrics["epoch"] == cut[0]  # metrics rank 0 reported with the checkpoint
    # B finished only the epochs before the cut, exactly once
    assert [led.epoch for led in summary_b.ledgers] == list(range(cut[0]))
    assert all(led.exactly_once for led in summary_b.ledgers)

    # run C: a new pipeline; the same RunConfig(name, storage_path) restores B's latest checkpoint
    pipe_c = mixflow.start(spec, name="rt_resume")
    try:
        result_c = _trainer(image_loop, {"name": "rt_resume"}, tmp / "train", "resumed").fit()
    finally:
        summary_c = pipe_c.close()
    assert result_c.error is None
    assert result_c.checkpoint.path == result_b.checkpoint.path  # C restored B's, reported none of its own
    after = result_c.return_value
    for r in range(2):
        assert after[r]["resumed_from"] == ["rank0.pt", "rank1.pt"]
        assert len(before[r]["batches"]) == len([b for b in whole[r]["batches"] if b["epoch"] < cut[0]]) + cut[1]
        resumed = before[r]["batches"] + after[r]["batches"]
        assert resumed == whole[r]["batches"], f"rank {r}: " + _stream_diff(resumed, whole[r]["batches"])
    # C's pipeline: the resumed epoch (and any after it) delivered every sample exactly once
    assert summary_c.exactly_once
    assert [led.epoch for led in summary_c.ledgers] == list(range(cut[0], 2))
    for led in summary_c.ledgers:
        assert led.exactly_once and led.delivered == led.expected == DIGITS, led.describe()
    cut_keys = sum(len(b["keys"]) for r in before for b in r["batches"] if b["epoch"] == cut[0])
    assert summary_c.ledgers[0].before_resume == cut_keys
    assert sorted(summary_c.ledgers[0].per_rank.values()) == sorted(
        len([k for b in r["batches"] if b["epoch"] == cut[0] for k in b["keys"]]) for r in after)
    # model + optimizer came back too: every step's loss, and the final weights, are the uninterrupted run's
    for r in range(2):
        np.testing.assert_allclose(before[r]["step_losses"] + after[r]["step_losses"], whole[r]["step_losses"],
                                   rtol=1e-6)
    for k, v in whole[0]["weights"].items():
        np.testing.assert_allclose(after[0]["weights"][k], v, rtol=1e-5, atol=1e-6)


# --- tokens --------------------------------------------------------------------------------------

# One Aioli round: step 0 evaluates p0 (uniform), three LearnParams sweeps of 3 steps (one per
# domain) over steps 1..9, then the learned mixture (steps=None) to the end. eta 3 instead of the
# paper's 0.1 for m=3: the normalised interaction matrix's column sums are O(1/m), and 0.1 of that
# moves p by ~0.01 — indistinguishable from noise in a 30-step test.
AIOLI_ONE_ROUND = {"lp_rounds": 1, "lp_steps": 3, "steps_per_round": 5, "rounds": 1, "eta": 3.0}


def token_loop(config: dict):
    import ray.train
    import ray.train.torch

    import mixflow

    feed = mixflow.feed(config["name"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(Bigram(feed.vocab_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def seq_loss(tokens):
        logits = model(tokens[:, :-1])
        flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                                 reduction="none")
        return flat.view(tokens.shape[0], -1).mean(1)

    seen, evals = [], 0
    for batch in feed.epoch(0):
        seen.append({"step": batch.step, "version": batch.version, "counts": batch.counts.tolist(),
                     "empty": batch.empty})
        if not batch.empty:  # both ranks build each step: DDP stays in step
            loss = seq_loss(batch.tokens)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
            feed.report(batch.step, per_domain_loss=batch.per_domain(loss))
        if batch.eval_after:
            with torch.no_grad():
                feed.report_eval(batch.step, [seq_loss(torch.from_numpy(v)).mean().item() for v in feed.held_out])
            evals += 1
    ray.train.report({"steps": len(seen), "evals": evals})
    feed.close()
    return _gather({"rank": ray.train.get_context().get_world_rank(), "seen": seen, "evals": evals})


def test_token_aioli_mixture_moves_under_torch_trainer(ray_session, text_domains, tmp_path):
    import mixflow
    from mixflow.config import validate_spec
    from mixflow.data.token_shard_writer import read_manifest

    vocab = read_manifest(text_domains / "python" / "train").vocab_size  # what each worker's feed must say
    spec = validate_spec({
        "kind": "tokens", "name": "tok", "seed": 3, "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(text_domains), "seq_len": 32, "eval_sequences": 16},
        "mixture": {"policy": "aioli", "params": AIOLI_ONE_ROUND},
        "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": 30, "batch_size": 8}})
    pipe = mixflow.start(spec, name="rt_tokens")
    assert pipe.kind == "tokens" and pipe.world_size == 2
    assert mixflow.connect("rt_tokens")._info["vocab_size"] == vocab  # what connect() gives a worker's feed
    try:
        result = _trainer(token_loop, {"name": "rt_tokens"}, tmp_path / "train", "tokens",
                          tmp_path / "reports.jsonl").fit()
    finally:
        summary = pipe.close()
    assert result.error is None
    records = result.return_value
    [reported] = _reports(tmp_path / "reports.jsonl")
    assert [m["steps"] for m in reported["metrics"]] == [30, 30]
    assert [m["evals"] for m in reported["metrics"]] == [rec["evals"] for rec in records]
    for rec in records:
        steps = [s["step"] for s in rec["seen"]]
        assert steps == list(range(30))
        for s in rec["seen"]:
            assert sum(s["counts"]) in (0, 8) and s["empty"] == (sum(s["counts"]) == 0)
        versions = [s["version"] for s in rec["seen"]]
        assert versions == sorted(versions) and len(set(versions)) > 2  # the mixture advanced mid-run
    # both ranks saw the same version at every step; the summary's batches are what the workers saw
    assert [s["version"] for s in records[0]["seen"]] == [s["version"] for s in records[1]["seen"]]
    for r in range(2):
        assert [(b["step"], b["version"]) for b in summary.batches[r]] == \
               [(s["step"], s["version"]) for s in records[r]["seen"]]
    trajectory = summary.trajectory
    assert len(trajectory) == 5 and [t["version"] for t in trajectory] == [0, 1, 2, 3, 4]
    first, last = np.asarray(trajectory[0]["p"]), np.asarray(trajectory[-1]["p"])
    np.testing.assert_allclose(first, np.full(3, 1 / 3))
    assert trajectory[0]["steps"] == 0 and trajectory[0]["eval_after"]  # evaluate p0 only
    for t in trajectory[1:4]:  # the sweeps: one domain up-weighted (one_hot_factor 0.5)
        assert t["steps"] == 3 and t["eval_after"]
        assert sorted(np.round(t["p"], 6)) == [0.25, 0.25, 0.5]
    assert trajectory[-1]["steps"] is None and not trajectory[-1]["eval_after"]  # learned: to the end
    np.testing.assert_allclose(last.sum(), 1.0)
    assert np.max(np.abs(last - first)) > 0.05, last
    # the workers trained on it: every step from its publication on carried the learned version
    schedule = [0] + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 20  # eval-only step 0, sweeps, learned p
    for rec in records:
        assert [s["version"] for s in rec["seen"]] == schedule
        assert [s["step"] for s in rec["seen"] if s["empty"]] == [0]
        assert rec["evals"] == 4  # after p0 (step 0) and after each sweep (steps 3, 6, 9)
    since = schedule.index(4)
    counts = np.sum([s["counts"] for r in records for s in r["seen"][since:]], axis=0)
    assert np.all(np.abs(counts - last * counts.sum()) <= 2), (counts, last)
    train_reports = [r for r in summary.reports if r["kind"] == "train"]
    assert len(train_reports) == len([s for s in records[0]["seen"] if not s["empty"]])
