"""The token pipeline on real Ray: 2 LM ranks, a mixture controller, proportions that move."""

from __future__ import annotations

import numpy as np
import pytest

from mixflow.config import validate_spec


def token_spec(root, tmp_path, policy, params=None, steps=24):
    return validate_spec({
        "kind": "tokens", "name": "tok", "seed": 3, "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(root), "seq_len": 32, "eval_sequences": 16},
        "mixture": {"policy": policy, "params": params or {}},
        "channel": {"max_items": 3, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "steps": steps, "batch_size": 8, "d_model": 32, "layers": 1, "heads": 2,
                    "eval_every": 0},
    })


def _check_versions(summary, batch_size):
    by_version = {t["version"]: np.asarray(t["p"]) for t in summary.trajectory}
    steps = [{b["step"]: b for b in rank} for rank in summary.batches]
    assert steps[0].keys() == steps[1].keys()
    for rank in steps:
        running: dict[int, np.ndarray] = {}
        for step in sorted(rank):
            b = rank[step]
            # the batch carries exactly the proportions published under its version
            np.testing.assert_allclose(b["p"], by_version[b["version"]])
            counts = np.asarray(b["counts"])
            assert counts.sum() in (0, batch_size)
            # realised composition: every prefix of a version within one sample of p * n per domain
            total = running.setdefault(b["version"], np.zeros_like(counts)) + counts
            running[b["version"]] = total
            assert np.all(np.abs(total - by_version[b["version"]] * total.sum()) < 1 + 1e-9), (step, total)
    for step in steps[0]:  # both ranks built each step from the same version
        assert steps[0][step]["version"] == steps[1][step]["version"]
    train = [r for r in summary.reports if r["kind"] == "train"]
    assert len(train) == len([s for s in steps[0].values() if sum(s["counts"])])
    for r in train:  # feedback attributed to the version that built the batch, counts summed over ranks
        assert r["version"] == steps[0][r["step"]]["version"]
        np.testing.assert_array_equal(r["counts"], np.add(steps[0][r["step"]]["counts"], steps[1][r["step"]]["counts"]))


def test_odm_moves_proportions_during_run_and_versions_match(ray_session, text_domains, tmp_path):
    from mixflow.runtime.token_pipeline import TokenPipeline

    summary = TokenPipeline(token_spec(text_domains, tmp_path, "odm"), show_progress=False).run()
    assert summary.steps == 24
    assert summary.tokens == 24 * 2 * 8 * 32
    assert len(summary.trajectory) > 3  # the mixture changed while training ran
    assert len({tuple(np.round(t["p"], 6)) for t in summary.trajectory}) > 3
    assert len({b["version"] for b in summary.batches[0]}) > 3
    _check_versions(summary, 8)
    assert all(np.isfinite(summary.test_loss))
    assert (tmp_path / "run" / "summary.json").is_file()


def test_unknown_policy_param_names_the_field(tmp_path):
    from mixflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mixture: .*params\.bogus: not a parameter of policy 'odm'"):
        token_spec(tmp_path, tmp_path, "odm", {"bogus": 1})
    with pytest.raises(ConfigError, match=r"unknown policy 'nope'"):
        token_spec(tmp_path, tmp_path, "nope")


AIOLI_SMALL = {"lp_rounds": 1, "lp_steps": 3, "steps_per_round": 5}


def _stream(summary):
    """Per rank: (step, version, p, keys, crc of the tokens) of every consumed batch."""
    return [[(b["step"], b["version"], tuple(np.round(b["p"], 12)), tuple(b["keys"]), b["crc"]) for b in rank]
            for rank in summary.batches]


def test_resume_continues_the_exact_stream(ray_session, text_domains, tmp_path):
    """Cut mid-LearnParams sweep and at a random step: before + after == uninterrupted, key for key,
    tensor (crc) for tensor, version for version; the resumed policy lands on the same proportions."""
    from mixflow.runtime.token_pipeline import TokenPipeline

    def spec(sub):
        raw = token_spec(text_domains, tmp_path / sub, "aioli", AIOLI_SMALL, steps=30).model_dump()
        raw["trainer"]["model"] = "unigram"
        return validate_spec(raw)

    full = TokenPipeline(spec("full"), show_progress=False).run()
    whole = _stream(full)
    # step 0 evaluates only; a sweep of 3 domains x 3 steps runs over steps 1..9
    cuts = [5, int(np.random.default_rng(11).integers(12, 29))]
    for cut in cuts:
        first = TokenPipeline(spec(f"a{cut}"), show_progress=False)
        before = _stream(first.run(stop_after=cut))
        path = tmp_path / f"ckpt{cut}.pt"
        first.save_checkpoint(path)
        import torch

        state = torch.load(path, weights_only=False)
        after = _stream(TokenPipeline(spec(f"b{cut}"), show_progress=False, resume_from=state).run())
        for rank in range(2):
            assert [b[0] for b in before[rank]] == list(range(cut))
            assert before[rank] + after[rank] == whole[rank], f"cut {cut} rank {rank}"
    assert len({b[1] for b in whole[0]}) > 3  # the mixture moved during the stream


def test_resume_rejects_a_checkpoint_of_another_setup(text_domains, tmp_path):
    from mixflow.runtime.token_pipeline import TokenPipeline

    state = {"format": "mixflow-token-pipeline/1", "seed": 99, "ranks_count": 2, "step": 3}
    with pytest.raises(ValueError, match="checkpoint has seed=99, the spec has seed=3"):
        TokenPipeline(token_spec(text_domains, tmp_path, "odm"), show_progress=False, resume_from=state).run()


def test_controller_and_producer_restarts_keep_the_stream(ray_session, text_domains, tmp_path):
    """ray.kill of the controller and of rank 0's producer mid-run: Ray restarts both; the controller
    reloads its state file (policy state survives), the producer resumes from its channel's position,
    and the run delivers exactly the stream of a run that was never disturbed."""
    import threading

    import ray

    from mixflow.runtime.token_pipeline import TokenPipeline

    def spec(sub):
        raw = token_spec(text_domains, tmp_path / sub, "aioli", AIOLI_SMALL, steps=40).model_dump()
        raw["trainer"]["model"] = "unigram"
        return validate_spec(raw)

    undisturbed = _stream(TokenPipeline(spec("calm"), show_progress=False).run())
    pipe = TokenPipeline(spec("killed"), show_progress=False)
    killed = {}

    def kill_midway():
        while not pipe.trainers or pipe.controller is None:
            threading.Event().wait(0.05)
        while ray.get(pipe.trainers[0].progress.remote())["steps"] < 12:
            threading.Event().wait(0.05)
        killed["pid"] = ray.get(pipe.controller.pid.remote())
        killed["version"] = ray.get(pipe.controller.stats.remote())["version"]
        killed["producer"] = ray.get(pipe.producers[0].pid.remote())
        ray.kill(pipe.controller, no_restart=False)
        ray.kill(pipe.producers[0], no_restart=False)

    thread = threading.Thread(target=kill_midway, daemon=True)
    thread.start()
    summary = pipe.run()
    thread.join(timeout=5)
    assert killed, "the controller was never killed"
    assert summary.controller["restored"] is True
    assert summary.controller["version"] > killed["version"]
    versions = [t["version"] for t in summary.trajectory]
    assert versions == list(range(len(versions)))  # one trajectory, no reset after the restart
    for rank in summary.batches:
        assert [b["step"] for b in rank] == list(range(40))
        keys = [k for b in rank for k in b["keys"]]
        assert len(keys) == len(set(keys))
    _check_versions(summary, 8)
    assert _stream(summary) == undisturbed  # key for key, token crc for crc, version for version
