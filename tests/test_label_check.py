"""``data.num_classes`` smaller than the data is a spec error naming the field, not quarantined classes (pure)."""

from __future__ import annotations

import shutil

import pytest

from mixflow.data.label_check import check_num_classes, read_labels
from mixflow.data.listing import list_shards
from mixflow.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def test_labels_beyond_num_classes_stop_the_run_naming_the_field(digits_shards, tmp_path):
    shards = list_shards(digits_shards)
    labels = read_labels(shards)
    assert len(labels) == 1797 and set(labels) == set(range(10))
    check_num_classes(digits_shards, shards, 10)
    check_num_classes(digits_shards, shards, 12)  # more classes than the data: fine
    with pytest.raises(ConfigError) as err:
        check_num_classes(digits_shards, shards, 9)
    assert err.value.problems == [("data.num_classes", f"9, but {digits_shards / 'classes.json'} says the shards "
                                                       "hold 10 classes; set data.num_classes: 10")]
    # Without classes.json the labels themselves decide: class 9 (180 samples) is out of range.
    bare = shutil.copytree(digits_shards, tmp_path / "bare", ignore=shutil.ignore_patterns("classes.json"))
    with pytest.raises(ConfigError) as err:
        check_num_classes(bare, list_shards(bare), 9)
    (field, message), = err.value.problems
    assert field == "data.num_classes"
    assert message.startswith("9, but 180 of 1797 samples read have labels outside 0..8 (labels seen: 0 (")
    assert message.endswith("9 (180)); set data.num_classes: 10")
    # A sample of the labels is read from a large set: the same verdict from 200 of them.
    with pytest.raises(ConfigError, match=r"of 200 samples read have labels outside 0\.\.8"):
        check_num_classes(bare, list_shards(bare), 9, limit=200)
