"""The output buffer pool hands memory out again only when nothing refers to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixflow.mix import buffer_pool
from mixflow.mix.buffer_pool import MIN_POOLED_BYTES, BufferPool

BIG = (4, MIN_POOLED_BYTES // 4)  # uint8: exactly the smallest pooled size

pytestmark = pytest.mark.skipif(buffer_pool.IDLE_REFS is None, reason="this interpreter's reference counts "
                                "do not allow pooling (the pool is off here)")


def like(shape=BIG, dtype=torch.uint8):
    return torch.zeros(shape, dtype=dtype)


def test_a_dropped_output_is_handed_out_again():
    pool = BufferPool(max_bytes=64 * 2**20)
    first = pool.take(like())
    ptr = first.data_ptr()
    del first
    second = pool.take(like())
    assert second.data_ptr() == ptr and pool.reused == 1
    assert second.shape == BIG and second.dtype == torch.uint8 and second.is_contiguous()


@pytest.mark.parametrize("keep", ["tensor", "view", "numpy", "slice_of_numpy", "reshape"])
def test_memory_is_never_shared_while_anything_refers_to_it(keep):
    pool = BufferPool(max_bytes=64 * 2**20)
    out = pool.take(like())
    out.fill_(7)
    held = {"tensor": lambda t: t, "view": lambda t: t[1:], "numpy": lambda t: t.numpy(),
            "slice_of_numpy": lambda t: t.numpy()[2], "reshape": lambda t: t.view(-1)}[keep](out)
    ptr = out.data_ptr()
    del out
    other = pool.take(like())
    assert other.data_ptr() != ptr and pool.reused == 0
    other.fill_(1)
    assert int(np.asarray(held).min()) == int(np.asarray(held).max()) == 7, "the held output was not overwritten"
    del held, other
    assert pool.take(like()).data_ptr() == ptr and pool.reused == 1, "idle again once the holder is gone"


def test_shapes_and_dtypes_get_their_own_buffers():
    pool = BufferPool(max_bytes=64 * 2**20)
    a = pool.take(like())
    ptr = a.data_ptr()
    del a
    b = pool.take(like(dtype=torch.int16))
    c = pool.take(like(shape=(2, MIN_POOLED_BYTES // 2)))
    assert ptr not in (b.data_ptr(), c.data_ptr())
    assert b.dtype == torch.int16 and c.shape == (2, MIN_POOLED_BYTES // 2)


def test_the_byte_cap_evicts_idle_buffers_and_never_busy_ones():
    nbytes = BIG[0] * BIG[1]
    pool = BufferPool(max_bytes=2 * nbytes)
    busy = pool.take(like())
    idle = pool.take(like(dtype=torch.int8))
    del idle
    assert pool.nbytes == 2 * nbytes
    third = pool.take(like(dtype=torch.int16))  # 2x the bytes: needs both slots, one is busy
    assert pool.nbytes <= 2 * nbytes and (BIG, torch.int8) not in {k for k, v in pool.arrays.items() if v}
    assert busy.data_ptr() in [a.ctypes.data for a in pool.arrays[(BIG, torch.uint8)]]
    assert third.shape == BIG and third.dtype == torch.int16


def test_small_and_non_cpu_like_buffers_are_not_pooled():
    pool = BufferPool(max_bytes=64 * 2**20)
    small = pool.take(torch.zeros(16))
    assert small.shape == (16,) and pool.nbytes == 0 and not pool.arrays


def test_bfloat16_is_served_but_not_pooled():
    pool = BufferPool(max_bytes=64 * 2**20)
    out = pool.take(like(shape=(4, MIN_POOLED_BYTES // 8), dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and pool.nbytes == 0


def test_zero_cap_turns_pooling_off():
    pool = BufferPool(max_bytes=0)
    pool.take(like())
    assert pool.nbytes == 0 and pool.reused == 0 and not any(pool.arrays.values())
    assert pool.take(like()).shape == BIG


def test_clear_forgets_buffers_but_live_outputs_keep_their_memory():
    pool = BufferPool(max_bytes=64 * 2**20)
    live = pool.take(like())
    live.fill_(3)
    pool.clear()
    assert pool.nbytes == 0 and not pool.arrays
    assert pool.take(like()).data_ptr() != live.data_ptr()
    assert int(live.min()) == 3
