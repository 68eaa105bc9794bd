"""Every adaptive mixture policy really adapts inside the token pipeline.

Each run: the counting unigram model (``trainer.model: unigram``) on 2 ranks over the three
session text domains, a few dozen steps. With its inputs present, every adaptive policy
ends on a mixture at L1 > 0.05 from its first one, having published several versions;
without them, the run warns by name (``MissingInputWarning``). DoReMi's reference phase
(``trainer.save_model``) and proxy phase (``trainer.reference_model``) chain as the README
documents. Plus the controller race that made short Aioli runs hang.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mixflow.config import validate_spec
from mixflow.mixture.input_watch import MissingInputWarning

STEPS = 30


def unigram_spec(root, run_dir, policy, params=None, steps=STEPS, **trainer):
    return validate_spec({
        "kind": "tokens", "name": f"adapt_{policy}", "seed": 5, "run_dir": str(run_dir),
        "data": {"shards": str(root), "seq_len": 32, "eval_sequences": 8},
        "mixture": {"policy": policy, "params": params or {}},
        "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 8, "model": "unigram", "eval_every": 0, **trainer},
    })


def run_quietly(spec):
    """The run's summary and the MissingInputWarnings it raised."""
    from mixflow.runtime.token_pipeline import TokenPipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = TokenPipeline(spec, show_progress=False).run()
    return summary, [w for w in caught if issubclass(w.category, MissingInputWarning)]


def moved(summary) -> float:
    """The largest L1 distance of a published mixture from the first (a policy may move and come
    back: ADO's fitted laws shift as the curves lengthen)."""
    p = np.asarray([t["p"] for t in summary.trajectory])
    return float(np.abs(p - p[0]).sum(axis=1).max())


# Params only where a default is sized for thousands of steps, not STEPS: each says why.
ADAPTIVE = {
    # rounds fitted to trainer.steps: one round fits 30 steps, and a round moves a uniform
    # mixture by at most eta (normalised estimate): the paper's m = 7 eta, not m = 3's 0.1
    "aioli": {"eta": 1.0},
    "tikmix_d": {"reports_per_update": 3},         # default 10 reports: 3 updates in 30 steps
    "tikmix_m": {"reports_per_update": 2},         # needs 2m records before it fits
    "doremi": {"ref_loss": [4.0, 4.0, 4.0]},       # a reference table (the model phase: below)
    "doge": {"eta": 0.05},                         # eta is the model's learning rate (unigram: none)
    "skill_it": {"graph_steps": 2, "round_steps": 4},  # graph estimated in-run: 3 x 2 steps
    "odm": {},
    "ado": {"min_points": 4, "refit_every": 2},    # default waits for 8 points, refits every 10
}


@pytest.mark.parametrize("policy", sorted(ADAPTIVE))
def test_every_adaptive_policy_moves_its_mixture_in_the_pipeline(ray_session, text_domains, tmp_path, policy):
    summary, warned = run_quietly(unigram_spec(text_domains, tmp_path / "run", policy, ADAPTIVE[policy]))
    assert len(summary.batches[0]) == STEPS  # eval-only steps (Aioli's, Skill-It's first) included
    assert summary.steps == sum(1 for b in summary.batches[0] if sum(b["counts"]))
    assert summary.missing_inputs == [] and warned == []
    assert summary.controller["version"] + 1 > 1
    assert moved(summary) > 0.05, summary.trajectory
    p = np.asarray([t["p"] for t in summary.trajectory])
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (p >= 0).all()
    # the batches trained on the published versions: later versions were really consumed
    consumed = {b["version"] for b in summary.batches[0] if sum(b["counts"])}
    assert max(consumed) > 0
    if policy == "aioli":
        check_aioli_ends_on_its_learned_mixture(summary)


def check_aioli_ends_on_its_learned_mixture(summary):
    """Rounds fitted to trainer.steps: the run ends training on the learned mixture, and the
    summary's LearnParams share is the share of trained batches from sweep versions."""
    stats = summary.controller["policy"]
    assert stats["round"] == stats["rounds"] >= 1
    last = summary.trajectory[-1]
    assert last["steps"] is None and last["version"] not in stats["sweep_versions"]
    trained = [b for b in summary.batches[0] if sum(b["counts"])]
    swept = sum(b["version"] in set(stats["sweep_versions"]) for b in trained)
    assert summary.learn_params_share == pytest.approx(swept / len(trained))
    assert 0 < summary.learn_params_share < 0.5
    assert trained[-1]["version"] == last["version"]  # the run ends on the learned mixture


def test_a_policy_without_its_inputs_warns_by_name(ray_session, text_domains, tmp_path):
    """TiKMiX-D moves on grad_dot_val; with grad_stats_every=0 no rank sends it."""
    summary, warned = run_quietly(unigram_spec(text_domains, tmp_path / "run", "tikmix_d", grad_stats_every=0))
    assert summary.missing_inputs == ["grad_dot_val"]
    assert summary.controller["version"] == 0 and moved(summary) == 0.0
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "'tikmix_d'" in text and "grad_dot_val" in text


def readme_doremi_commands() -> list[list[str]]:
    """The README's DoReMi commands (its "DoReMi's two phases" block), as argv lists."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index("DoReMi's two phases"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("mixflow run")]


def test_doremi_reference_phase_then_proxy_phase_by_the_readme_commands(ray_session, text_domains, tmp_path,
                                                                         monkeypatch):
    """The README's two commands, run by ``mixflow run`` itself (sized down with more --set):
    a stratified run saves the reference model; the DoReMi run loads it, reports its
    per-domain loss on every batch (ref_loss), and DoReMi moves on every step."""
    import json
    from pathlib import Path

    import torch

    from mixflow.cli import main
    from mixflow.demos.lm_loop import MODEL_FORMAT

    commands = readme_doremi_commands()
    assert len(commands) == 2 and "mixture.policy=stratified" in commands[0] and "mixture.policy=doremi" in commands[1]
    spec = str(Path(__file__).resolve().parents[1] / "pipelines" / "llm_mixture.yaml")
    small = ["--no-progress"] + [a for kv in (
        f"data.shards={text_domains}", "data.machine_domains=null", "data.seq_len=32", "data.eval_sequences=8",
        "channel.max_bytes=1MiB", "trainer.model=unigram", f"trainer.steps={STEPS}", "trainer.batch_size=8",
        "trainer.eval_every=0") for a in ("--set", kv)]
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (runs/doremi/...) land here
    for argv in commands:
        assert main([a.replace("pipelines/llm_mixture.yaml", spec) for a in argv] + small) == 0

    saved = torch.load(tmp_path / "runs" / "doremi" / "reference.pt", weights_only=False)
    assert saved["format"] == MODEL_FORMAT and saved["model"] == "unigram"
    # rank 0's counts: the add-one prior plus every target token it trained on
    assert saved["state"]["counts"].sum().item() > STEPS * 8 * 32 * 0.9
    reference = json.loads((tmp_path / "runs" / "doremi" / "reference" / "summary.json").read_text())
    proxy = json.loads((tmp_path / "runs" / "doremi" / "proxy" / "summary.json").read_text())
    assert reference["policy"] == "stratified" and reference["controller"]["version"] == 0
    assert proxy["policy"] == "doremi" and proxy["missing_inputs"] == []
    # the proxy starts untrained, so its loss exceeds the reference's: one DoReMi step per step
    assert proxy["controller"]["version"] == STEPS
    p = [t["p"] for t in proxy["trajectory"]]
    assert np.abs(np.subtract(p[-1], p[0])).sum() > 0.05


def test_doremi_spec_without_reference_is_refused(tmp_path):
    from mixflow.errors import ConfigError

    with pytest.raises(ConfigError, match="DoReMi needs reference losses"):
        unigram_spec(tmp_path, tmp_path / "run", "doremi")


def test_ranks_woken_together_for_a_one_step_mixture_get_the_same_answer(ray_session):
    """Both producers wait for the mixture of step 1 (version 0 is an eval-only step); the
    policy then publishes a one-step sweep. The first rank woken takes its only step for
    step 1; the other must get that same answer (it used to wait for the next version,
    which needs its own report of step 1: a deadlock in every short Aioli run)."""
    import ray

    from mixflow.runtime.mixture_controller import MixtureController

    ctl = MixtureController.remote("aioli", {"lp_rounds": 1, "lp_steps": 1, "steps_per_round": 1, "rounds": 1},
                                   2, 2, None)
    first = ray.get([ctl.mixture_for_step.remote(0) for _ in range(2)])
    assert first[0] == first[1] and first[0]["empty"] and first[0]["eval_after"]
    waiting = [ctl.mixture_for_step.remote(1) for _ in range(2)]
    ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
    assert ready == []  # both wait: version 0 has no step left
    for rank in range(2):
        ray.get(ctl.report.remote(rank, "eval", {"version": 0, "step": 0, "eval_loss": [5.0, 5.0]}))
    answers = ray.get(waiting, timeout=30)
    assert answers[0] == answers[1]
    assert answers[0]["version"] == 1 and answers[0]["steps"] == 1 and answers[0]["eval_after"]
    ray.kill(ctl)
