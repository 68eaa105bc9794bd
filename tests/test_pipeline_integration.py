"""The image pipeline end to end on real Ray, real DALI and real shards."""

from __future__ import annotations

import subprocess
import sys

from mixflow.data.listing import dataset_keys, list_shards
from mixflow.runtime.batch_ring import PREFIX, ring_dir
from mixflow.runtime.image_pipeline import ImagePipeline
from tests.conftest import make_spec


def test_every_key_reaches_exactly_one_rank_once(ray_session, digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, trainer={"epochs": 2}, runtime={"readers_per_rank": 2})
    pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
    summary = pipe.run()
    keys = set(dataset_keys(list_shards(digits_shards)))
    assert len(keys) == 1797
    for epoch, ledger in enumerate(summary.ledgers):
        assert ledger.exactly_once, ledger.describe()
        assert ledger.delivered == ledger.expected == 1797
        assert sum(ledger.per_rank.values()) == 1797
    # Independently of the ledger: per epoch, the ranks' key lists are disjoint and cover the dataset.
    steps_per_epoch = {r: [d for d in digests] for r, digests in pipe.digests.items()}
    delivered = [k for digests in steps_per_epoch.values() for d in digests for k in d[1]]
    assert len(delivered) == 2 * 1797 and set(delivered) == keys
    assert (tmp_path / "run" / "summary.json").exists()


def test_same_seed_gives_identical_batches(ray_session, digits_shards, tmp_path):
    """Also through either data plane: run 0 reads pixels from the shared-memory ring, run 1 from
    Ray's object store; and the ring leaves no file behind."""
    runs = []
    for i in range(2):
        spec = make_spec(digits_shards, tmp_path / str(i), channel={"shared_memory": i == 0})
        pipe = ImagePipeline(spec, show_progress=False, record_digests=True)
        summary = pipe.run()
        runs.append(pipe.digests)
        ring_steps = [r.shared_memory_steps for r in summary.ranks]
        if i == 0:  # a trainer stalled on a loaded machine may see a batch sent the other way
            assert all(0 < n <= r.steps for n, r in zip(ring_steps, summary.ranks)), ring_steps
        else:
            assert ring_steps == [0, 0]
        assert not list(ring_dir().glob(f"{PREFIX}{pipe.ring_tag}*"))
    assert runs[0].keys() == {0, 1}
    for rank in (0, 1):
        assert len(runs[0][rank]) > 10
        assert runs[0][rank] == runs[1][rank]  # keys, pixel crc and soft-target crc, batch by batch
    other = ImagePipeline(make_spec(digits_shards, tmp_path / "other", seed=8), show_progress=False,
                          record_digests=True)
    other.run()
    assert other.digests[0] != runs[0][0]


def test_slow_rank_bounds_bytes_and_fast_rank_keeps_receiving(ray_session, digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, channel={"max_items": 64, "max_bytes": 200_000},
                     trainer={"throttle": {1: 0.15}})
    summary = ImagePipeline(spec, show_progress=False).run()
    fast, slow = summary.ranks
    assert summary.exactly_once
    peaks = summary.channel_peaks
    for peak in peaks:
        assert peak["max_batch_bytes"] > 0
        # Producer-side bytes in flight (queued + waiting for credit) stay within the bound + one batch.
        assert peak["peak_in_flight"] <= peak["max_bytes"] + peak["max_batch_bytes"]
        assert peak["peak_bytes"] <= peak["max_bytes"]
    # The slow rank's producer was held back by credit, not by item count.
    assert peaks[1]["put_wait_s"] > 1.0
    assert peaks[1]["peak_items"] < 64
    # The fast rank got its whole share long before the slow one finished.
    assert fast.samples > 800 and slow.samples > 800
    assert fast.wall_s < 0.5 * slow.wall_s


def test_invalid_spec_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {shards: nowhere, num_classes: 10}\ndecode: {device: tpu}\n"
                   "trainer: {ranks: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "mixflow.cli", "run", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "decode.device" in proc.stdout and "'auto', 'cpu' or 'gpu'" in proc.stdout
    assert "trainer.ranks" in proc.stdout and "greater than or equal to 1" in proc.stdout


def test_trainer_ranks_train_and_loss_goes_down(ray_session, digits_shards, tmp_path):
    spec = make_spec(digits_shards, tmp_path, decode={"size": [32, 32], "scale": [0.35, 1.0], "flip_prob": 0.0},
                     mix={"method": "mixup_cutmix", "mixup_alpha": 0.2, "label_smoothing": 0.1},
                     trainer={"epochs": 3, "batch_size": 64, "model": "digits_cnn", "lr": 0.05})
    summary = ImagePipeline(spec, show_progress=False).run()
    assert summary.exactly_once
    for rank in summary.ranks:
        assert len(rank.epoch_loss) == 3
        assert rank.epoch_loss[-1] < rank.epoch_loss[0] - 0.1, rank.epoch_loss
