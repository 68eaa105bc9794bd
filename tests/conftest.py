"""Shared fixtures: one embedded Ray session for the whole test run, real demo shards."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Dummy credentials for the local S3 endpoint (tests/test_object_store.py), set before Ray starts so
# its worker processes (the readers) find them where a user's would be: the standard AWS variables.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "mixflow-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "mixflow-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from mixflow.runtime.ray_session import ensure_ray

    ensure_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's 1,797 digits as JPEG shards (real data, built by the test run)."""
    from mixflow.data.demo_sets import build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(out, max_bytes=128 * 2**10)
    return out


@pytest.fixture(scope="session")
def text_domains(tmp_path_factory):
    """Three real text domains from this machine, small."""
    from mixflow.data.text_domains import machine_documents
    from mixflow.data.token_shard_writer import write_domain_splits

    root = tmp_path_factory.mktemp("text")
    for name in ("python", "c_headers", "licenses"):
        write_domain_splits(machine_documents(name, max_bytes=160 * 2**10), root, name, 0.15,
                            max_bytes=64 * 2**10)
    return root


def make_spec(shards, tmp_path, **sections):
    """A small pipeline spec over ``shards``; ``sections`` override whole sections or fields."""
    from mixflow.config import validate_spec

    raw = {
        "name": "test",
        "seed": 7,
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(shards), "num_classes": 10},
        "decode": {"size": [24, 24], "scale": [0.5, 1.0]},
        "mix": {"method": "mixup_cutmix", "label_smoothing": 0.1},
        "channel": {"max_items": 4, "max_bytes": "1MiB"},
        "trainer": {"ranks": 2, "epochs": 1, "batch_size": 32, "model": "none"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_spec(raw)
