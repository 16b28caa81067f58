from __future__ import annotations

import pytest
import torch

from radixkv.mem import ReqToTokenPool


def test_table_shape_dtype_and_rows():
    pool = ReqToTokenPool(3, 16)
    assert pool.req_to_token.shape == (4, 16)
    assert pool.req_to_token.dtype == torch.int32
    rows = {pool.alloc() for _ in range(3)}
    assert rows == {1, 2, 3}  # row 0 is padding
    assert pool.available_size() == 0


def test_running_out_of_rows_is_a_clear_error():
    pool = ReqToTokenPool(1, 4)
    pool.alloc()
    with pytest.raises(RuntimeError, match="max_running_requests"):
        pool.alloc()


def test_free_returns_a_row_and_rejects_bad_rows():
    pool = ReqToTokenPool(2, 4)
    row = pool.alloc()
    pool.free(row)
    assert pool.available_size() == 2
    with pytest.raises(ValueError):
        pool.free(0)
    pool.alloc()
    pool.alloc()
    pool.clear()
    assert pool.available_size() == 2


def test_write_and_read_positions():
    pool = ReqToTokenPool(2, 8)
    row = pool.alloc()
    pool.write(row, 2, torch.tensor([7, 8, 9]))
    assert pool.read(row, 2, 5).tolist() == [7, 8, 9]
    assert pool.read(row, 2, 5).dtype == torch.int64
    with pytest.raises(ValueError, match="max_context_len"):
        pool.write(row, 6, torch.tensor([1, 2, 3]))
