"""The token pipeline graph: Parquet domains -> producers -> channels -> LM trainer ranks, with a
mixture controller in the loop.

Each trainer rank runs the spec's entrypoint on its token feed: a user's ``trainer.entrypoint``,
or the built-in LM loop that ``trainer.model`` names (:mod:`mixflow.demos.lm_loop`).

Each rank owns a :class:`TokenProducer` (its own disjoint shards of every domain) and a
credit-based channel. Producers take each step's mixture from the
:class:`MixtureController` (one answer for all ranks), trainers report per-domain losses
back to it, and the policy's new proportions reach the producers while training runs.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mixflow.config import TokenPipelineSpec
from mixflow.data.bad_samples import SkipRecord, write_quarantine
from mixflow.data.object_store import PROCESS_STATS, RemoteDir, is_url, list_prefixes, stats_since
from mixflow.data.text_domains import machine_documents
from mixflow.data.token_shard_writer import MANIFEST, read_manifest, write_domain_splits
from mixflow.data.token_source import TokenSource
from mixflow.errors import DataError, PipelineError
from mixflow.mixture.input_watch import MissingInputWarning
from mixflow.runtime.actor_names import named, new_name
from mixflow.runtime.channel import Channel
from mixflow.runtime.mixture_controller import MixtureController
from mixflow.runtime.placement import actor_options, rank_nodes, rank_placement, stage_names, stage_options, wait_started
from mixflow.runtime.state_journal import StateJournal
from mixflow.runtime.progress import PipelineProgress
from mixflow.runtime.ray_session import ensure_ray
from mixflow.runtime.stage_failure import stop_stages, wait_for_stages
from mixflow.runtime.summary import store_line, store_total
from mixflow.runtime.token_producer import TokenProducer
from mixflow.runtime.token_trainer_actor import TokenTrainerRank

SHARDS_PER_DOMAIN = 8
GRADIENT_POLICIES = ("tikmix_d", "tikmix_m", "doge")  # consume Feedback.grad_dot_val
GRAD_STATS_EVERY = 5


def prepare_domains(spec: TokenPipelineSpec, console: Console | None = None) -> list[Path]:
    """The domain directories under ``data.shards`` (each with ``train/`` and ``validation/``):
    those named by ``data.machine_domains`` (built from this machine's text when absent), or
    else every domain found there."""
    if is_url(spec.data.shards):
        return remote_domains(spec)
    root = Path(spec.data.shards)
    if not spec.data.machine_domains:
        found = sorted(d for d in root.glob("*") if (d / "train" / MANIFEST).is_file())
        if not found:
            raise DataError(f"no token domains (<domain>/train/{MANIFEST}) and data.machine_domains is not set",
                            shard=str(root))
        return found
    shard_bytes = max(4096, spec.data.max_bytes_per_domain * 4 // SHARDS_PER_DOMAIN)
    for name in spec.data.machine_domains:
        if (root / name / "train" / MANIFEST).is_file():
            continue
        if console:
            console.print(f"building text domain '{escape(name)}' into {escape(str(root / name))}")
        docs = machine_documents(name, spec.data.max_bytes_per_domain)
        write_domain_splits(docs, root, name, spec.data.val_fraction, max_bytes=shard_bytes)
    return [root / name for name in spec.data.machine_domains]


def remote_domains(spec: TokenPipelineSpec) -> list[RemoteDir]:
    """The domains under a ``data.shards`` URL: those ``data.machine_domains`` names (they must be
    there: nothing is built into a bucket), or every prefix holding ``<domain>/train/`` + manifest."""
    root = RemoteDir(spec.data.shards.rstrip("/"), spec.data.store)
    names = spec.data.machine_domains or list_prefixes(root.url, root.store.options, PROCESS_STATS)
    found = []
    for name in names:
        try:
            read_manifest(root / name / "train")
        except DataError:
            if spec.data.machine_domains:
                raise DataError(f"data.machine_domains: domain {name!r} is not in the bucket (nothing is built into "
                                "object storage: write it with `mixflow shards --text ... --out URL`)",
                                shard=str(root / name / "train" / MANIFEST)) from None
            continue
        found.append(root / name)
    if not found:
        raise DataError(f"no token domains (<domain>/train/{MANIFEST})", shard=str(root))
    return found


def held_out_sets(domain_dirs: list[Path], seq_len: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per domain, the first ``count`` packed validation sequences: even ones for the policy
    (validation), odd ones for the reported results (test)."""
    val, test = [], []
    for d in domain_dirs:
        source = TokenSource(d / "validation", seq_len, shuffle=False, infinite=False)
        seqs = [s.tokens for _, s in zip(range(count), source)]
        if len(seqs) < 2:
            raise DataError(f"validation split has {len(seqs)} sequence(s) of {seq_len + 1} tokens; need 2",
                            shard=str(d / "validation"))
        arr = np.stack(seqs).astype(np.int64)
        val.append(arr[0::2])
        test.append(arr[1::2])
    return val, test


def grad_stats_every(spec: TokenPipelineSpec) -> int:
    """How often ranks report gradient statistics: ``trainer.grad_stats_every``, else every
    ``GRAD_STATS_EVERY`` steps when the policy consumes them, else never."""
    every = spec.trainer.grad_stats_every
    if every is None:
        every = GRAD_STATS_EVERY if spec.mixture.policy in GRADIENT_POLICIES else 0
    return every


def policy_params(spec: TokenPipelineSpec) -> dict:
    """The policy's keyword arguments: ``mixture.params``, the floor, and what the run decides
    for it: Aioli's ``total_steps`` (``trainer.steps``, so its rounds fit the run and the run
    ends on a learned mixture) unless given."""
    params = dict(spec.mixture.params)
    if spec.mixture.floor:
        params["floor"] = spec.mixture.floor
    if spec.mixture.policy == "aioli":
        params.setdefault("total_steps", spec.trainer.steps)
    return params


def token_stream_fields(spec: TokenPipelineSpec, domain_dirs: list[Path]) -> dict:
    """The spec fields that decide a token stream; a feed state must match them."""
    return {"seed": spec.seed, "policy": spec.mixture.policy, "params": spec.mixture.params,
            "floor": spec.mixture.floor, "domains": [d.name for d in domain_dirs],
            "seq_len": spec.data.seq_len, "batch_size": spec.trainer.batch_size, "steps": spec.trainer.steps}


@dataclass
class TokenRunSummary:
    name: str
    policy: str
    domains: list[str]
    startup_s: float
    wall_s: float
    tokens: int
    steps: int
    wait_s: list[float]
    test_loss: list[float]
    trajectory: list[dict]
    controller: dict
    skipped: int
    curve: list[dict] = field(default_factory=list)
    batches: list[list[dict]] = field(default_factory=list)  # per rank, per batch: step, version, counts, p
    reports: list[dict] = field(default_factory=list)  # merged feedback: kind, version, step, counts
    placement: list[dict] = field(default_factory=list)  # per rank: node of its trainer, producer, channel
    store: dict = field(default_factory=dict)  # object-store counts (shards from a URL): driver + producers

    @property
    def missing_inputs(self) -> list[str]:
        """Feedback fields the policy moves on that no report carried (it could not move)."""
        return list(self.controller.get("missing_inputs") or [])

    @property
    def learn_params_share(self) -> float | None:
        """Aioli: the share of the run's training steps spent in LearnParams sweeps (None for
        other policies)."""
        sweeps = (self.controller.get("policy") or {}).get("sweep_versions")
        if sweeps is None or not self.batches:
            return None
        trained = [b for b in self.batches[0] if sum(b["counts"])]
        swept = set(sweeps)
        return sum(b["version"] in swept for b in trained) / len(trained) if trained else 0.0

    def warn_missing_inputs(self) -> None:
        if self.missing_inputs:
            warnings.warn(f"mixture policy {self.policy!r} never received {', '.join(self.missing_inputs)} "
                          f"during the run, so it kept its first mixture (see mixflow.mixture.input_watch)",
                          MissingInputWarning, stacklevel=3)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def test_perplexity(self) -> list[float]:
        return [math.exp(v) for v in self.test_loss]

    @property
    def mean_perplexity(self) -> float:
        """NaN when the run measured no test loss (a user's own loop under ``mixflow.start``)."""
        return float(np.mean(self.test_perplexity)) if self.test_loss else math.nan

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "test_perplexity": self.test_perplexity,
                "mean_perplexity": self.mean_perplexity, "missing_inputs": self.missing_inputs,
                "learn_params_share": self.learn_params_share}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))

    def render(self, console: Console) -> None:
        console.print(f"[bold]{escape(self.name)}[/] ({self.policy}): {self.tokens} tokens in {self.wall_s:.1f} s = "
                      f"[bold]{self.tokens_per_s:.0f} tokens/s[/] over {self.steps} steps "
                      f"(actors started in {self.startup_s:.1f} s)")
        table = Table("domain", "final p", "test loss", "test perplexity")
        final_p = self.trajectory[-1]["p"]
        losses = zip(self.test_loss, self.test_perplexity) if self.test_loss else [(None, None)] * len(final_p)
        for name, p, (loss, ppl) in zip(self.domains, final_p, losses):
            table.add_row(escape(name), f"{p:.3f}", "-" if loss is None else f"{loss:.3f}", "-" if ppl is None else f"{ppl:.2f}")
        console.print(table)
        c = self.controller
        console.print(f"mixture versions: {c['version'] + 1}; controller update latency p50 {c['latency_ms_p50']:.2f} ms, "
                      f"p99 {c['latency_ms_p99']:.2f} ms; mean test perplexity {self.mean_perplexity:.3f}")
        if self.learn_params_share is not None:
            console.print(f"LearnParams sweeps: {100 * self.learn_params_share:.1f}% of the training steps")
        if self.missing_inputs:
            console.print(f"[yellow]policy {escape(self.policy)} never received {', '.join(self.missing_inputs)}: "
                          "it could not move its mixture[/]")
        console.print("waiting for data per rank: " + ", ".join(f"r{r}: {w:.1f} s" for r, w in enumerate(self.wait_s)))
        if self.store:
            console.print(store_line(self.store))
        if self.skipped:
            console.print(f"[yellow]{self.skipped} bad documents skipped (see quarantine.jsonl)[/]")


class TokenPipeline:
    def __init__(self, spec: TokenPipelineSpec, console: Console | None = None, show_progress: bool = True,
                  resume_from: dict | None = None):
        self.spec = spec
        self.resume_from = resume_from
        self.state: dict | None = None  # set by run(stop_after=...): the checkpoint to resume from
        self.console = console or Console()
        self.show_progress = show_progress
        self.controller = None
        self.placement: list[dict] = []
        self.channels: list = []
        self.producers: list = []
        self.trainers: list = []
        self.rank_results: list = []  # what each rank's entrypoint returned, by rank

    def _start_actors(self, domain_dirs: list[Path], val: list[np.ndarray], test: list[np.ndarray]) -> None:
        spec, t = self.spec, self.spec.trainer
        run_dir = spec.run_path
        run_dir.mkdir(parents=True, exist_ok=True)
        state_path = run_dir / "controller_state.json"
        StateJournal(state_path).remove()  # no earlier run's history for a restarted controller to resume
        resume = self.resume_from
        params = policy_params(spec)
        m = len(domain_dirs)
        manifest = read_manifest(domain_dirs[0] / "train")
        pad_id = manifest.pad_id
        # Producers and the controller are restartable: they get their peers' names, not handles.
        controller_name = new_name("controller")
        self.controller = MixtureController.options(**named(controller_name)).remote(
            spec.mixture.policy, params, m, t.ranks, str(state_path), resume["controller"] if resume else None)
        channel_names = [new_name(f"channel-r{r}") for r in range(t.ranks)]
        # Multi-node: each rank's producer, channel and trainer on one node (runtime.placement).
        nodes = rank_nodes(spec, stage_options(spec, "trainer"))
        self.channels = [Channel.options(**named(name), **actor_options(spec, "channel", "cpu", nodes[r], {})).remote(
            f"r{r}", spec.channel.max_items, spec.channel.max_bytes) for r, name in enumerate(channel_names)]
        self.producers = [TokenProducer.options(**actor_options(spec, "producer", "cpu", nodes[r], {})).remote(r, t.ranks, [d / "train" for d in domain_dirs], spec.data.seq_len,
                                               t.batch_size, spec.seed, spec.on_error, controller_name,
                                               channel_names[r],
                                               resume["ranks"][r]["feed"]["producer"] if resume else None,
                                               resume["step"] if resume else 0)
                          for r in range(t.ranks)]
        grad_every = grad_stats_every(spec)
        stream = token_stream_fields(spec, domain_dirs)
        spec_json = spec.model_dump_json()
        self.trainers = [TokenTrainerRank.options(**actor_options(spec, "trainer", "cpu", nodes[r], {})).remote(
            spec_json, r, t.ranks, self.channels[r], self.controller, stream, [v[r::t.ranks] for v in val], test,
            manifest.vocab_size, pad_id, grad_every, [os.getcwd()])
            for r in range(t.ranks)]
        started = wait_started(stage_names(self.controller, trainer=self.trainers, producer=self.producers,
                                           channel=self.channels), spec.runtime.start_timeout)
        self.placement = rank_placement(started, t.ranks, kinds=("trainer", "producer", "channel"))
        master_addr, master_port = ray.get(self.trainers[0].address.remote())
        ray.get([tr.setup.remote(master_addr, master_port, resume["ranks"][r] if resume else None)
                 for r, tr in enumerate(self.trainers)])

    def _stop(self, reason: str | None = None) -> None:
        stop_stages(reason, self.channels, self.trainers,
                    self.producers + ([self.controller] if self.controller else []))
        self.trainers, self.producers, self.channels, self.controller = [], [], [], None

    def run(self, stop_after: int | None = None) -> TokenRunSummary:
        """Run to ``trainer.steps``; with ``stop_after``, stop once every rank consumed global step
        ``stop_after - 1`` and keep the checkpoint in ``self.state`` (see :meth:`save_checkpoint`)."""
        spec, t = self.spec, self.spec.trainer
        first_step = self._check_resume()
        if stop_after is not None and not first_step < stop_after < t.steps:
            raise ValueError(f"stop_after must be in ({first_step}, {t.steps}), got {stop_after}")
        before = PROCESS_STATS.as_dict()
        domain_dirs = prepare_domains(spec, self.console)
        val, test = held_out_sets(domain_dirs, spec.data.seq_len, spec.data.eval_sequences)
        driver_stats = stats_since(before)  # listing, manifests, the held-out sets
        ensure_ray(spec.runtime.address, spec.runtime.runtime_env)
        start = time.perf_counter()
        try:
            self._start_actors(domain_dirs, val, test)
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            producers = {p.run.remote(first_step, t.steps): f"producer r{r}" for r, p in enumerate(self.producers)}
            trainers = {tr.run.remote(stop_after): f"trainer r{r}" for r, tr in enumerate(self.trainers)}
            total = ((stop_after or t.steps) - first_step) * t.ranks * t.batch_size * spec.data.seq_len
            with PipelineProgress(total, self.show_progress, self.console, unit="tokens") as progress:
                results = self._wait(producers | trainers, set(trainers), progress)
            wall_s = time.perf_counter() - start
            if stop_after is not None:
                self.state = self._checkpoint(stop_after)  # producers are stopped mid-stream below
            else:
                ray.get(list(producers))
            store = (store_total(driver_stats, ray.get([p.store_stats.remote() for p in self.producers]))
                     if is_url(spec.data.shards) else {})
            trajectory = ray.get(self.controller.get_trajectory.remote())
            stats = ray.get(self.controller.stats.remote())
            reports = ray.get(self.controller.get_merged_log.remote())
        except BaseException as exc:
            self._stop(f"pipeline stopping: {exc or type(exc).__name__}")
            raise
        self._stop()
        ranks = sorted((results[r] for r in trainers), key=lambda r: r["rank"])
        self.rank_results = [r["result"] for r in ranks]
        skipped = [SkipRecord(**rec) for r in ranks for rec in r["skipped"]]
        main = ranks[0]["result"] if isinstance(ranks[0]["result"], dict) else {}
        summary = TokenRunSummary(spec.name, spec.mixture.policy, [d.name for d in domain_dirs], startup_s, wall_s,
                                  sum(r["tokens"] for r in ranks), ranks[0]["steps"], [r["wait_s"] for r in ranks],
                                  main.get("test_loss") or [], trajectory, stats, len(skipped),
                                  main.get("curve") or [], [r["batches"] for r in ranks], reports, self.placement,
                                  store)
        summary.save(spec.run_path / "summary.json")
        summary.warn_missing_inputs()
        if skipped:
            write_quarantine(spec.run_path / "quarantine.jsonl", skipped)
        return summary

    def _checkpoint(self, step: int) -> dict:
        ranks = ray.get([tr.checkpoint.remote() for tr in self.trainers])
        for r in ranks:
            if r["feed"]["step"] != step - 1:
                raise PipelineError(f"rank {r['rank']} stopped after step {r['feed']['step']}, not {step - 1}")
        return {"format": "mixflow-token-pipeline/1", "name": self.spec.name, "seed": self.spec.seed,
                "ranks_count": self.spec.trainer.ranks, "step": step,
                "controller": ray.get(self.controller.state_dict.remote()), "ranks": ranks}

    def _check_resume(self) -> int:
        state = self.resume_from
        if state is None:
            return 0
        if state.get("format") != "mixflow-token-pipeline/1":
            raise ValueError("resume_from is not a mixflow token pipeline checkpoint")
        for key, value in (("seed", self.spec.seed), ("ranks_count", self.spec.trainer.ranks)):
            if state[key] != value:
                raise ValueError(f"checkpoint has {key}={state[key]}, the spec has {key}={value}")
        return int(state["step"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the checkpoint of a stopped run (torch.save: model tensors included)."""
        import torch

        if self.state is None:
            raise ValueError("no checkpoint: run(stop_after=...) first")
        torch.save(self.state, path)

    def _wait(self, refs: dict, until_done: set, progress: PipelineProgress) -> dict:
        return wait_for_stages(refs, until_done, self.channels, self.trainers, progress, "tokens")
