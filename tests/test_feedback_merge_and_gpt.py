"""Merging per-rank feedback, and the byte GPT's per-sequence / per-domain losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixflow.mixture.feedback_merge import FeedbackMerger, merge_reports
from mixflow.mixture.policy import Feedback
from mixflow.demos.byte_gpt import ByteGPT, ByteGPTConfig
from mixflow.train.lm_losses import per_domain_mean, per_sequence_loss


def test_merge_weights_train_loss_by_tokens_and_sums_counts():
    a = Feedback(3, 10, train_loss=np.array([1.0, np.nan, 3.0]), tokens=np.array([100, 0, 300]),
                 counts=np.array([1, 0, 3]))
    b = Feedback(3, 10, train_loss=np.array([2.0, 5.0, np.nan]), tokens=np.array([300, 100, 0]),
                 counts=np.array([3, 1, 0]))
    m = merge_reports([a, b])
    # domain 0: (1*100 + 2*300) / 400 = 1.75; domain 1 only from b; domain 2 only from a
    np.testing.assert_allclose(m.train_loss, [1.75, 5.0, 3.0])
    np.testing.assert_array_equal(m.counts, [4, 1, 3])
    np.testing.assert_array_equal(m.tokens, [400, 100, 300])


def test_merge_keeps_nan_for_domains_no_rank_saw():
    a = Feedback(0, 1, train_loss=np.array([1.0, np.nan]), tokens=np.array([10, 0]))
    b = Feedback(0, 1, train_loss=np.array([3.0, np.nan]), tokens=np.array([30, 0]))
    m = merge_reports([a, b])
    assert m.train_loss[0] == pytest.approx(2.5) and math.isnan(m.train_loss[1])


def test_merge_eval_is_mean_over_ranks():
    m = merge_reports([Feedback(1, 5, eval_loss=np.array([2.0, 4.0])), Feedback(1, 5, eval_loss=np.array([4.0, 6.0]))])
    np.testing.assert_allclose(m.eval_loss, [3.0, 5.0])
    assert m.train_loss is None


def test_merger_waits_for_every_rank_and_ignores_retried_reports():
    merger = FeedbackMerger(2)
    fb = Feedback(0, 0, train_loss=np.array([1.0]), tokens=np.array([1]))
    assert merger.add(0, "train", fb) is None
    assert merger.pending == 1
    assert merger.add(0, "train", fb) is None  # a retried call: ignored, counted
    assert merger.duplicates == 1
    # a different kind of the same step is its own report
    assert merger.add(1, "eval", Feedback(0, 0, eval_loss=np.array([2.0]))) is None
    merged = merger.add(1, "train", Feedback(0, 0, train_loss=np.array([3.0]), tokens=np.array([1])))
    assert merged.train_loss[0] == pytest.approx(2.0)
    assert merger.pending == 1
    # a retry arriving after the step was merged does not reopen it
    assert merger.add(1, "train", Feedback(0, 0, train_loss=np.array([3.0]), tokens=np.array([1]))) is None
    assert merger.pending == 1 and merger.duplicates == 2
    with pytest.raises(ValueError, match="rank 2 outside world of 2"):
        merger.add(2, "train", fb)


def test_merger_state_round_trip_keeps_half_merged_reports():
    merger = FeedbackMerger(2)
    merger.add(1, "train", Feedback(4, 7, train_loss=np.array([2.0, np.nan]), tokens=np.array([5, 0])))
    restored = FeedbackMerger(1)
    restored.load_state_dict(merger.state_dict())
    merged = restored.add(0, "train", Feedback(4, 7, train_loss=np.array([4.0, 1.0]), tokens=np.array([5, 2])))
    np.testing.assert_allclose(merged.train_loss, [3.0, 1.0])


def test_per_sequence_loss_matches_flat_cross_entropy():
    torch.manual_seed(0)
    model = ByteGPT(ByteGPTConfig(seq_len=16, d_model=32, layers=1, heads=2))
    tokens = torch.randint(0, 256, (3, 17))
    per_seq = per_sequence_loss(model, tokens)
    logits = model(tokens[:, :-1])
    for i in range(3):
        expect = F.cross_entropy(logits[i], tokens[i, 1:])
        assert per_seq[i].item() == pytest.approx(expect.item(), rel=1e-5)


def test_per_sequence_loss_leaves_out_padding():
    torch.manual_seed(0)
    model = ByteGPT(ByteGPTConfig(seq_len=8, d_model=16, layers=1, heads=2))
    tokens = torch.randint(0, 256, (2, 9))
    tokens[1, 6:] = 257
    got = per_sequence_loss(model, tokens, pad_id=257)
    logits = model(tokens[:, :-1])
    expect = F.cross_entropy(logits[1, :5], tokens[1, 1:6])
    assert got[1].item() == pytest.approx(expect.item(), rel=1e-5)
    assert got[0].item() == pytest.approx(per_sequence_loss(model, tokens)[0].item(), rel=1e-6)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = ByteGPT(ByteGPTConfig(seq_len=8, d_model=16, layers=2, heads=2)).eval()
    a = torch.randint(0, 256, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 256
    torch.testing.assert_close(model(a)[0, :5], model(b)[0, :5])
    assert not torch.allclose(model(a)[0, 5], model(b)[0, 5])


def test_gpt_rejects_long_input_and_bad_heads():
    model = ByteGPT(ByteGPTConfig(seq_len=4, d_model=8, layers=1, heads=2))
    with pytest.raises(ValueError, match="sequence length 5 exceeds the model's seq_len 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        ByteGPTConfig(d_model=10, heads=4)


def test_per_domain_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0])
    domains = torch.tensor([0, 2, 0, 2])
    out = per_domain_mean(values, domains, 3)
    assert out[0].item() == 2.0 and out[2].item() == 3.5 and math.isnan(out[1].item())


def test_unigram_lm_loss_is_exact_and_falls_with_data():
    from mixflow.demos.unigram_lm import UnigramLM

    lm = UnigramLM(4, pad_id=3)
    tokens = torch.tensor([[0, 1, 1, 3]])
    # uniform add-one counts: -log(1/4) for the two real targets, the pad left out
    assert lm.per_sequence_loss(tokens).item() == pytest.approx(math.log(4))
    lm.update(tokens)  # counts [1, 3, 1, 1]
    assert lm.per_sequence_loss(tokens).item() == pytest.approx(-math.log(3 / 6))
