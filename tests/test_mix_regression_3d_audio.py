"""Mixing methods whose data are not labelled images: C-Mixup (regression), Mix3D (point
clouds) and beat-synchronous audio mixup, plus their registry / config entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixflow.config import validate_mix
from mixflow.errors import ConfigError
from mixflow.mix import METHODS, build_mixer
from mixflow.mix.beat_sync_mixup import alignment_shift, beat_grid, beat_sync_mixup, shift_time, tempo_matching
from mixflow.mix.c_mixup import c_mixup, c_mixup_probs, draw_partners
from mixflow.mix.mix3d import mix3d
from mixflow.mix.point_scenes import PointScenes, pack_scenes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- C-Mixup

LABELS = torch.tensor([0.0, 0.5, 1.5, 3.0])


def kernel_table(labels: np.ndarray, sigma: float) -> np.ndarray:
    """P(j|i) ∝ exp(-||y_i - y_j||^2 / (2 sigma^2)), j != i, written out independently."""
    y = labels.reshape(len(labels), -1)
    n = len(y)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = math.exp(-float(((y[i] - y[j]) ** 2).sum()) / (2 * sigma**2))
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_c_mixup_table_is_the_gaussian_label_kernel(sigma):
    probs = c_mixup_probs(LABELS, sigma)
    assert probs.dtype == torch.float64
    np.testing.assert_allclose(probs.numpy(), kernel_table(LABELS.numpy(), sigma), rtol=1e-12, atol=1e-15)
    # Hand-computed row 0 for sigma = 1: weights exp(-0.125), exp(-1.125), exp(-4.5).
    if sigma == 1.0:
        w = np.array([math.exp(-0.125), math.exp(-1.125), math.exp(-4.5)])
        np.testing.assert_allclose(probs[0, 1:].numpy(), w / w.sum(), rtol=1e-12)
        assert probs[0, 0] == 0


def test_c_mixup_table_multidimensional_labels_and_self():
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(c_mixup_probs(y, 2.0).numpy(), kernel_table(y.numpy(), 2.0), rtol=1e-12)
    with_self = c_mixup_probs(y, 2.0, exclude_self=False)
    row = np.array([1.0, math.exp(-25 / 8), math.exp(-1 / 8)])
    np.testing.assert_allclose(with_self[0].numpy(), row / row.sum(), rtol=1e-12)


def test_c_mixup_far_labels_underflow_to_zero_not_nan():
    probs = c_mixup_probs(torch.tensor([0.0, 1e4, 1e4 + 1.0]), 1.0)
    assert torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0)
    # Sample 0 is 1e4 sigmas from everyone: its row is flat over the others (softmax of equal-ish
    # huge negatives keeps their ratio), never the sample itself.
    assert probs[0, 0] == 0 and probs[1, 2] == 1.0 and probs[2, 1] == 1.0


def test_c_mixup_partner_frequencies_follow_the_kernel():
    probs = c_mixup_probs(LABELS, 1.0)
    draws = 20000
    rows = torch.arange(len(LABELS)).repeat_interleave(draws)
    partners = draw_partners(probs, rng(11), rows).view(len(LABELS), draws)
    expected = kernel_table(LABELS.numpy(), 1.0)
    for i in range(len(LABELS)):
        counts = np.bincount(partners[i].numpy(), minlength=len(LABELS))
        assert counts[i] == 0, "a sample was drawn as its own partner"
        nz = expected[i] > 0
        exp_counts = expected[i][nz] * draws
        chi2 = float((((counts[nz] - exp_counts) ** 2) / exp_counts).sum())
        assert chi2 < 16.27, (i, counts, exp_counts)  # chi-square, 3 categories (2 dof), p = 0.0003


def test_c_mixup_draw_partners_over_a_dataset_table():
    labels = torch.linspace(0, 10, 50)
    table = c_mixup_probs(labels, 0.3)
    rows = torch.tensor([0, 49, 25, 25])
    p = draw_partners(table, rng(0), rows)
    assert p.shape == (4,) and p.dtype == torch.int64
    assert bool((p != rows).all())
    # bandwidth 0.3 with label spacing ~0.2: partners are neighbours in label space
    assert bool(((labels[p] - labels[rows]).abs() < 1.5).all())


def test_c_mixup_batch_mixes_inputs_and_targets_with_one_lam():
    b = 8
    x = torch.randn(b, 5)
    y = torch.tensor([0.0, 0.1, 0.2, 0.3, 9.0, 9.1, 9.2, 9.3])
    out = c_mixup(x, y, rng(3), alpha=2.0, sigma=0.5)
    lam = out.lam
    assert torch.equal(lam, torch.full((b,), float(lam[0])))
    assert bool((out.perm != torch.arange(b)).all())
    # partners stay inside their label cluster (cross-cluster weight ~exp(-160))
    assert bool(((out.perm < 4) == (torch.arange(b) < 4)).all())
    w = lam.view(-1, 1)
    torch.testing.assert_close(out.x, w * x + (1 - w) * x[out.perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.y, lam * y + (1 - lam) * y[out.perm], rtol=0, atol=1e-6)
    again = c_mixup(x, y, rng(3), alpha=2.0, sigma=0.5)
    assert torch.equal(again.x, out.x) and torch.equal(again.perm, out.perm) and torch.equal(again.lam, out.lam)


def test_c_mixup_partners_over_many_batches_follow_the_kernel():
    x = torch.zeros(4, 1)
    counts = np.zeros((4, 4))
    for seed in range(600):
        perm = c_mixup(x, LABELS, rng(seed)).perm
        counts[np.arange(4), perm.numpy()] += 1
    np.testing.assert_allclose(counts / 600, kernel_table(LABELS.numpy(), 1.0), atol=0.06)


def test_c_mixup_elem_mode_and_vector_targets():
    x = torch.randn(6, 2, 3)
    y = torch.randn(6, 2)
    out = c_mixup(x, y, rng(1), mode="elem")
    assert len(set(out.lam.tolist())) == 6
    w = out.lam.view(-1, 1)
    torch.testing.assert_close(out.y, w * y + (1 - w) * y[out.perm], rtol=0, atol=1e-6)


def test_c_mixup_errors_name_the_parameter():
    x, y = torch.randn(4, 2), torch.randn(4)
    with pytest.raises(ValueError, match=r"mode 'pair'.*batch, elem"):
        c_mixup(x, y, rng(0), mode="pair")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        c_mixup(x, y, rng(0), sigma=0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        c_mixup(x[:1], y[:1], rng(0))
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        c_mixup(x, y[:3], rng(0))


# --------------------------------------------------------------------------- Mix3D

SIZES = [3, 4, 5, 2, 6]


def make_scenes(sizes=SIZES, offset=10.0):
    """Scene s: points with coords around (offset*s, ...), feature = global point id, label = 100*s + k."""
    scenes, pid = [], 0
    gen = torch.Generator().manual_seed(0)
    for s, n in enumerate(sizes):
        coords = torch.randn(n, 3, generator=gen, dtype=torch.float64) + offset * (s + 1)
        feats = torch.arange(pid, pid + n, dtype=torch.float64).view(n, 1).repeat(1, 2)
        labels = 100 * s + torch.arange(n)
        scenes.append((coords, feats, labels))
        pid += n
    return pack_scenes(scenes), scenes


def test_mix3d_keeps_every_point_and_label_and_halves_the_batch():
    (x, y), scenes = make_scenes()
    out = mix3d(x, y, rng(4))
    assert out.x.num_scenes == math.ceil(len(SIZES) / 2) == 3
    ids = out.x.feats[:, 0].long()
    assert torch.equal(ids.sort().values, torch.arange(sum(SIZES)))  # each point exactly once
    # each point keeps its own label and features
    assert torch.equal(out.y, y[ids])
    assert torch.equal(out.x.feats, x.feats[ids])
    # the odd batch leaves exactly one scene alone; the others are pairs covering every scene once
    src = out.sources
    assert int((src[:, 1] == -1).sum()) == 1
    used = src[src >= 0]
    assert sorted(used.tolist()) == list(range(len(SIZES)))
    scene_of = x.scene_ids()
    for k in range(out.x.num_scenes):
        lo, hi = int(out.x.offsets[k]), int(out.x.offsets[k + 1])
        a, b = int(src[k, 0]), int(src[k, 1])
        expect = torch.cat([torch.nonzero(scene_of == a).flatten()]
                           + ([torch.nonzero(scene_of == b).flatten()] if b >= 0 else []))
        assert torch.equal(ids[lo:hi], expect)  # points of a, then points of b, in their order


def test_mix3d_centres_each_scene_before_concatenating():
    (x, y), scenes = make_scenes()
    out = mix3d(x, y, rng(4))
    ids = out.x.feats[:, 0].long()
    scene_of = x.scene_ids()[ids]
    for s, (coords, _, _) in enumerate(scenes):
        part = out.x.coords[scene_of == s]
        torch.testing.assert_close(part.mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(part, coords - coords.mean(0), rtol=0, atol=1e-12)
    raw = mix3d(x, y, rng(4), centre=False)
    assert torch.equal(raw.x.coords, x.coords[ids])


def test_mix3d_even_batch_and_empty_scene_and_determinism():
    (x, y), _ = make_scenes([4, 0, 3, 5])
    out = mix3d(x, y, rng(9))
    assert out.x.num_scenes == 2 and bool((out.sources >= 0).all())
    assert int(out.x.offsets[-1]) == 12 and torch.isfinite(out.x.coords).all()
    again = mix3d(x, y, rng(9))
    assert torch.equal(again.x.coords, out.x.coords) and torch.equal(again.sources, out.sources)
    assert any(not torch.equal(mix3d(x, y, rng(s)).sources, out.sources) for s in range(10, 20))


def test_mix3d_input_errors():
    (x, y), _ = make_scenes([2, 3])
    with pytest.raises(ValueError, match="y has 4 labels but x has 5 points"):
        mix3d(x, y[:4], rng(0))
    with pytest.raises(ValueError, match="offsets must be non-decreasing from 0 to N=5"):
        PointScenes(x.coords, x.feats, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match=r"coords must be \[N, 3\]"):
        PointScenes(x.coords[:, :2], x.feats, x.offsets)


# --------------------------------------------------------------------------- beat-synchronous mixup

SR = 100  # samples per second: beat times in hundredths land on whole samples
T = 400


def click_track(first_s: float, period_s: float, n: int = T) -> tuple[torch.Tensor, list[float]]:
    """1.0 at each beat sample, 0 elsewhere; and the beat times (s)."""
    beats = [first_s + k * period_s for k in range(int((n / SR - first_s) / period_s) + 1)
             if round((first_s + k * period_s) * SR) < n]
    wave = torch.zeros(n)
    wave[[round(b * SR) for b in beats]] = 1.0
    return wave, beats


def batch_of(firsts, periods):
    waves, beats = zip(*(click_track(f, p) for f, p in zip(firsts, periods)))
    k = max(len(b) for b in beats)
    padded = torch.zeros(len(beats), k, dtype=torch.float64)
    for i, b in enumerate(beats):
        padded[i, : len(b)] = torch.tensor(b, dtype=torch.float64)
    return torch.stack(waves), padded, torch.tensor([len(b) for b in beats])


def test_alignment_shift_hand_computed():
    first = torch.tensor([0.10, 0.37], dtype=torch.float64)
    period = torch.tensor([0.5, 0.5], dtype=torch.float64)
    known = torch.tensor([True, True])
    shift = alignment_shift(first, period, known, torch.tensor([1, 0]))
    # sample 0: d = 0.10 - 0.37 = -0.27 -> +0.23 (mod 0.5); sample 1: 0.27 -> -0.23
    torch.testing.assert_close(shift, torch.tensor([0.23, -0.23], dtype=torch.float64), rtol=0, atol=1e-12)


def test_shift_time_moves_and_zero_fills():
    x = torch.arange(1.0, 7.0).view(1, 6).repeat(2, 1)
    out = shift_time(x, torch.tensor([2, -1]))
    assert torch.equal(out, torch.tensor([[0.0, 0, 1, 2, 3, 4], [2, 3, 4, 5, 6, 0]]))


def test_partner_beats_land_on_the_sample_beats_after_mixing():
    firsts = [0.10, 0.37, 0.05, 0.49, 0.21, 0.30]
    x, beats, counts = batch_of(firsts, [0.5] * 6)
    y = torch.arange(6)
    for seed in range(5):
        mb = beat_sync_mixup(x, y, rng(seed), num_classes=6, beats=beats, beat_counts=counts, sample_rate=SR,
                             pairing="derangement")
        lam = mb.lam.view(-1, 1)
        partner_part = mb.x - lam * x  # (1-lam) * shifted partner
        for i in range(6):
            own = set(torch.nonzero(x[i]).flatten().tolist())
            landed = set(torch.nonzero(partner_part[i].abs() > 1e-6).flatten().tolist())
            assert landed and landed <= own, (seed, i, sorted(landed), sorted(own))
            # lost at most the clicks shifted past the clip edge (one beat here)
            assert len(landed) >= int(counts[mb.perm[i]]) - 1


def test_beat_sync_mixup_equals_mixup_of_the_shifted_partner():
    x, beats, counts = batch_of([0.10, 0.37], [0.5, 0.5])
    mb = beat_sync_mixup(x, torch.tensor([0, 1]), rng(2), num_classes=2, beats=beats, beat_counts=counts,
                         sample_rate=SR)
    assert mb.perm.tolist() == [1, 0]
    shifted = shift_time(x[[1, 0]], torch.tensor([23, -23]))
    lam = mb.lam.view(-1, 1)
    torch.testing.assert_close(mb.x, lam * x + (1 - lam) * shifted, rtol=0, atol=1e-7)
    assert float(mb.lam[0]) != 1.0


def test_tempo_metadata_gives_the_same_alignment_as_beat_times():
    x, beats, counts = batch_of([0.10, 0.37, 0.05, 0.49], [0.5] * 4)
    by_beats = beat_sync_mixup(x, torch.arange(4), rng(7), num_classes=4, beats=beats, beat_counts=counts,
                               sample_rate=SR)
    by_tempo = beat_sync_mixup(x, torch.arange(4), rng(7), num_classes=4, tempo=[120.0] * 4,
                               first_beat=[0.10, 0.37, 0.05, 0.49], sample_rate=SR)
    assert torch.equal(by_beats.perm, by_tempo.perm)
    torch.testing.assert_close(by_beats.x, by_tempo.x, rtol=0, atol=1e-7)


def test_beat_grid_edge_cases():
    beats = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    first, period, known = beat_grid(3, beats, torch.tensor([3, 1, 0]))
    assert first.tolist() == [0.5, 0.2, 0.0] and known.tolist() == [True, True, False]
    assert period[0] == 0.5 and math.isinf(period[1]) and math.isinf(period[2])
    # one-beat partner: plain difference; no-beat partner (or sample): no shift
    shift = alignment_shift(first, period, known, torch.tensor([1, 2, 0]))
    torch.testing.assert_close(shift, torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_tempo_pairing_matches_neighbouring_tempos():
    assert tempo_matching(np.array([1.0, 0.496, 1.02, 0.5]), rng(0)).tolist() == [2, 3, 0, 1]
    perm = tempo_matching(60.0 / np.array([60.0, 61.0, 120.0, 200.0, 201.0]), rng(0))
    assert sorted(perm.tolist()) == list(range(5)) and bool((perm != np.arange(5)).all())
    assert perm[3] == 4 and perm[4] == 3  # the two fastest pair up
    x, beats, counts = batch_of([0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.52, 0.26])
    mb = beat_sync_mixup(x, torch.arange(4), rng(0), num_classes=4, beats=beats, beat_counts=counts,
                         sample_rate=SR)  # default pairing: tempo
    assert mb.perm.tolist() == [2, 3, 0, 1]


def test_beat_sync_mixup_stereo_seed_and_prob():
    x, beats, counts = batch_of([0.10, 0.37, 0.05, 0.49], [0.5] * 4)
    stereo = torch.stack([x, 2 * x], dim=1)  # [B, 2, T]
    kw = dict(num_classes=4, beats=beats, beat_counts=counts, sample_rate=SR, pairing="derangement")
    a = beat_sync_mixup(stereo, torch.arange(4), rng(5), **kw)
    b = beat_sync_mixup(stereo, torch.arange(4), rng(5), **kw)
    mono = beat_sync_mixup(x, torch.arange(4), rng(5), **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.perm, b.perm)
    torch.testing.assert_close(a.x[:, 0], mono.x, rtol=0, atol=0)
    torch.testing.assert_close(a.x[:, 1], 2 * mono.x, rtol=0, atol=1e-6)
    kept = beat_sync_mixup(x, torch.arange(4), rng(5), prob=0.0, **kw)
    assert torch.equal(kept.x, x) and torch.equal(kept.lam, torch.ones(4))


def test_beat_sync_mixup_errors_name_the_parameter():
    x, beats, counts = batch_of([0.1, 0.2], [0.5, 0.5])
    with pytest.raises(ValueError, match="pass beats .*or tempo"):
        beat_sync_mixup(x, torch.arange(2), rng(0), num_classes=2)
    with pytest.raises(ValueError, match="unknown pairing 'bpm'.*tempo"):
        beat_sync_mixup(x, torch.arange(2), rng(0), num_classes=2, tempo=[120, 120], pairing="bpm")
    with pytest.raises(ValueError, match="tempo must be > 0"):
        beat_sync_mixup(x, torch.arange(2), rng(0), num_classes=2, tempo=[120, 0])
    with pytest.raises(ValueError, match=r"beat_counts must lie in 0\.\.8"):
        beat_sync_mixup(x, torch.arange(2), rng(0), num_classes=2, beats=beats, beat_counts=[9, 1])
    with pytest.raises(ValueError, match="expected float audio"):
        beat_sync_mixup(x.to(torch.uint8), torch.arange(2), rng(0), num_classes=2, tempo=[120, 120])


# --------------------------------------------------------------------------- registry and config


def test_registry_calls_keep_the_x_y_rng_shape():
    y = torch.tensor([0.0, 0.2, 5.0, 5.3])
    reg = build_mixer("c_mixup", 10, alpha=2.0, sigma=1.0, mode="batch")(torch.randn(4, 3), y, rng(0))
    assert reg.method == "c_mixup" and reg.y.shape == (4,)
    (x3, y3), _ = make_scenes()
    assert build_mixer("mix3d", 10, centre=True)(x3, y3, rng(0)).x.num_scenes == 3
    x, beats, counts = batch_of([0.1, 0.37], [0.5, 0.5])
    audio = build_mixer("beat_sync_mixup", 2, sample_rate=SR)
    mb = audio(x, torch.tensor([0, 1]), rng(2), beats=beats, beat_counts=counts)  # per-batch metadata at call time
    assert mb.num_classes == 2 and mb.method == "beat_sync_mixup"
    assert {"c_mixup", "mix3d", "beat_sync_mixup"} <= set(METHODS)


def test_config_defaults_match_the_papers():
    assert validate_mix({"method": "c_mixup"}).model_dump() == {
        "method": "c_mixup", "alpha": 2.0, "sigma": 1.0, "mode": "batch"}
    assert validate_mix({"method": "mix3d"}).centre is True
    b = validate_mix({"method": "beat_sync_mixup"})
    assert (b.alpha, b.pairing, b.sample_rate) == (5.0, "tempo", 16000.0)


@pytest.mark.parametrize("mix, field, words", [
    ({"method": "c_mixup", "sigma": 0}, "mix.sigma", "greater than 0"),
    ({"method": "c_mixup", "mode": "pair"}, "mix.mode", "'batch' or 'elem'"),
    ({"method": "mix3d", "alpha": 1.0}, "mix.alpha", "unknown field; allowed fields: centre, method"),
    ({"method": "beat_sync_mixup", "pairing": "bpm"}, "mix.pairing", "'tempo'"),
    ({"method": "beat_sync_mixup", "sample_rate": -1}, "mix.sample_rate", "greater than 0"),
])
def test_config_errors_name_the_field(mix, field, words):
    with pytest.raises(ConfigError) as err:
        validate_mix(mix)
    problems = dict(err.value.problems)
    assert list(problems) == [field] and words in problems[field], problems


def test_spec_sections_build_mixers():
    for raw, args in (({"method": "c_mixup", "sigma": 0.5}, (torch.randn(4, 2), torch.randn(4))),
                      ({"method": "mix3d"}, make_scenes()[0])):
        params = validate_mix(raw).model_dump()
        out = build_mixer(params.pop("method"), 10, **params)(*args, rng(0))
        assert out.method == raw["method"]


# --------------------------------------------------------------------------- devices


@cuda
def test_gpu_results_match_cpu():
    x, y = torch.randn(8, 3), torch.randn(8)
    cpu = c_mixup(x, y, rng(1))
    gpu = c_mixup(x.cuda(), y.cuda(), rng(1))
    assert torch.equal(gpu.perm.cpu(), cpu.perm)
    torch.testing.assert_close(gpu.x.cpu(), cpu.x)
    (xs, ys), _ = make_scenes()
    g = PointScenes(xs.coords.cuda(), xs.feats.cuda(), xs.offsets.cuda())
    assert torch.equal(mix3d(g, ys.cuda(), rng(3)).y.cpu(), mix3d(xs, ys, rng(3)).y)
    wave, beats, counts = batch_of([0.1, 0.37, 0.2], [0.5] * 3)
    a = beat_sync_mixup(wave, torch.arange(3), rng(4), num_classes=3, beats=beats, beat_counts=counts, sample_rate=SR)
    b = beat_sync_mixup(wave.cuda(), torch.arange(3).cuda(), rng(4), num_classes=3, beats=beats.cuda(),
                        beat_counts=counts.cuda(), sample_rate=SR)
    torch.testing.assert_close(b.x.cpu(), a.x)
