"""The transformers engine's running KV cache (openrl/sampler/hf_cache.py): a RoomLayer shows
exactly what transformers' DynamicLayer would hold, writes decode steps in place, copies
rarely, and never grows past its horizon. The engine-level checks (every sequence equal to its
request alone, the cache tight, few copies over a long generation) are in test_continuous.py."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from openrl.sampler.hf_cache import MIN_ROOM, RoomLayer


def kv(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, 2, width, 4), generator=g), torch.randn((rows, 2, width, 4), generator=g)


def plain(keys, values) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def test_updates_equal_a_dynamic_layer_and_copy_only_a_few_times():
    ref = plain(*kv(3, 5, 0))
    room = RoomLayer.joined([plain(*kv(3, 5, 0))], 5, horizon=400)
    buffers = [room._k]
    for step in range(300):
        k, v = kv(3, 1, step + 1)
        ref.update(k, v)
        keys, values = room.update(k, v)
        if room._k is not buffers[-1]:
            buffers.append(room._k)
        assert torch.equal(keys, ref.keys) and torch.equal(values, ref.values)
        assert room.get_seq_length() == ref.get_seq_length() == 6 + step
    # Room of half the width (16 at least) each time the window fills its buffer.
    assert [b.shape[2] for b in buffers] == [21, 38, 58, 88, 133, 201, 303, 400]
    assert room.capacity == 400  # the horizon, not 1.5 x 305


def test_the_room_never_passes_the_horizon_but_a_wider_window_still_fits():
    room = RoomLayer.joined([plain(*kv(2, 10, 0))], 10, horizon=12)
    assert room.capacity == 12
    for step in range(4):  # two past the horizon: the horizon was wrong, the layer still right
        room.update(*kv(2, 1, step + 1))
    assert room.get_seq_length() == 14 and room.capacity >= 14
    assert RoomLayer.joined([plain(*kv(2, 10, 0))], 10, horizon=1000).capacity == 10 + MIN_ROOM


def test_a_step_with_room_writes_in_place():
    room = RoomLayer.joined([plain(*kv(2, 8, 0))], 8, horizon=100)
    buf, before = room._k, room.keys.clone()
    room.update(*kv(2, 1, 1))
    assert room._k is buf and room.keys.data_ptr() == buf.data_ptr()
    assert torch.equal(room.keys[:, :, :8], before)


def test_joined_right_aligns_each_part_with_zeros_before():
    a, b = kv(2, 3, 0), kv(1, 6, 1)
    room = RoomLayer.joined([plain(*a), plain(*b)], 7, horizon=50)
    assert room.keys.shape == (3, 2, 7, 4)
    assert torch.equal(room.keys[:2, :, 4:], a[0]) and not room.keys[:2, :, :4].any()
    assert torch.equal(room.values[2:, :, 1:], b[1]) and not room.values[2:, :, :1].any()


def test_cutting_leading_columns_keeps_the_buffer_and_selecting_rows_keeps_the_room():
    room = RoomLayer.joined([plain(*kv(4, 6, 0))], 6, horizon=100)
    ref = plain(room.keys.clone(), room.values.clone())
    buf = room._k
    room.keys, room.values = room.keys[:, :, 2:], room.values[:, :, 2:]  # what Scheduler._trim does
    ref.keys, ref.values = ref.keys[:, :, 2:], ref.values[:, :, 2:]
    step = kv(4, 1, 1)
    room.update(*step)
    ref.update(*step)
    assert room._k is buf and torch.equal(room.keys, ref.keys)
    idx = torch.tensor([3, 1])
    room.batch_select_indices(idx)
    ref.batch_select_indices(idx)
    assert torch.equal(room.keys, ref.keys) and torch.equal(room.values, ref.values)
    capacity = room.capacity
    step = kv(2, 1, 2)
    room.update(*step)
    ref.update(*step)
    assert room.capacity == capacity and torch.equal(room.keys, ref.keys)  # the room came along


def test_a_window_replaced_by_another_tensor_is_copied_into_a_new_buffer():
    room = RoomLayer.joined([plain(*kv(2, 6, 0))], 6, horizon=100)
    room.crop(-2)  # transformers' own crop: a view of the buffer, with the same strides
    ref = plain(room.keys.clone(), room.values.clone())
    room.keys = room.keys.contiguous().clone()  # not a view of the buffer
    step = kv(2, 1, 1)
    room.update(*step)
    ref.update(*step)
    assert torch.equal(room.keys, ref.keys) and torch.equal(room.values, ref.values)


@pytest.mark.parametrize("cut", [0, 3])
def test_start_is_found_from_the_views_offset(cut):
    room = RoomLayer.joined([plain(*kv(2, 6, 0))], 6, horizon=100)
    room.keys, room.values = room.keys[:, :, cut:], room.values[:, :, cut:]
    assert room._start() == cut
    room.values = room.values.clone()
    assert room._start() is None and room.capacity == 0  # the buffer is let go, not held beside the copy


def test_append_writes_the_new_rows_in_place_and_equals_joining():
    a, b = kv(3, 5, 0), kv(2, 7, 1)  # the new rows' prompt is longer: the window widens left
    room = RoomLayer.joined([plain(*a)], 5, horizon=100, max_rows=64)
    for step in range(4):  # some room used on the right, the window no longer at column 0
        room.update(*kv(3, 1, 10 + step))
    room.keys, room.values = room.keys[:, :, 3:], room.values[:, :, 3:]  # cut 3 leading columns
    ref = RoomLayer.joined([plain(room.keys.clone(), room.values.clone()), plain(*b)], 7, horizon=100)
    buf = room._k
    assert room.append(plain(*b), 7, horizon=100) is room and room._k is buf  # in place
    assert torch.equal(room.keys, ref.keys) and torch.equal(room.values, ref.values)
    assert room.keys.shape == (5, 2, 7, 4)
    step = kv(5, 1, 20)
    room.update(*step)
    ref.update(*step)
    assert torch.equal(room.keys, ref.keys)


def test_append_without_room_joins_into_a_new_buffer():
    full = RoomLayer.joined([plain(*kv(3, 5, 0))], 5, horizon=100, max_rows=4)  # 4 rows of room at most
    assert full.row_capacity == 4
    joined = full.append(plain(*kv(2, 5, 1)), 5, horizon=100)
    assert joined is not full and joined.keys.shape[0] == 5 and joined.row_capacity == 5
    narrow = RoomLayer.joined([plain(*kv(3, 5, 0))], 5, horizon=100, max_rows=64)  # the window at column 0
    wider = narrow.append(plain(*kv(1, 9, 2)), 9, horizon=100)  # no column to widen into on the left
    assert wider is not narrow and wider.keys.shape == (4, 2, 9, 4) and not wider.keys[:3, :, :4].any()


def test_columns_exposed_by_append_never_show_another_rows_stale_keys():
    """A row that left a NaN behind (an adapter that overflowed) cannot reach the rows that take
    its place: what append shows is zeroed or written."""
    room = RoomLayer.joined([plain(*kv(4, 6, 0))], 6, horizon=100, max_rows=64)
    room.update(*kv(4, 1, 1))
    room.keys, room.values = room.keys[:, :, 4:], room.values[:, :, 4:]  # cut 4: the window starts at 4
    room.keep_rows(torch.tensor([0, 3, 2]), torch.tensor([1]), torch.tensor([3]))  # row 1 left, row 3 moved in
    shown = room.keys.clone(), room.values.clone()
    for buf, window in zip((room._k, room._v), shown):
        buf.fill_(float("nan"))  # every cell the window does not show: poisoned
        buf[:3, :, 4:7] = window
    room.append(plain(*kv(2, 5, 2)), 5, horizon=100)  # widen by 2 to the left, 2 rows below
    assert room.keys.shape == (5, 2, 5, 4) and room.keys.isfinite().all() and room.values.isfinite().all()
    assert torch.equal(room.keys[:3, :, 2:], shown[0]) and not room.keys[:3, :, :2].any()
    room.update(*kv(5, 1, 3))
    room.append(plain(*kv(1, 2, 4)), 6, horizon=100)  # a shorter prompt: 4 columns of left padding
    assert room.keys.shape == (6, 2, 6, 4) and not room.keys[5, :, :4].any() and not room.values[5, :, :4].any()
    room.update(*kv(6, 1, 5))
    assert room.keys.isfinite().all() and room.values.isfinite().all()


def test_keep_rows_moves_only_the_rows_that_change_place():
    room = RoomLayer.joined([plain(*kv(5, 6, 0))], 6, horizon=100, max_rows=64)
    ref = plain(room.keys.clone(), room.values.clone())
    buf = room._k
    keep = torch.tensor([0, 4, 2])  # rows 1 and 3 left; row 4 moves into row 1's place
    room.keep_rows(keep, torch.tensor([1]), torch.tensor([4]))
    ref.batch_select_indices(keep)
    assert room._k is buf and torch.equal(room.keys, ref.keys) and torch.equal(room.values, ref.values)
    keep = torch.tensor([1, 2])  # a general order: correct too (gathered, then written)
    room.keep_rows(keep, torch.tensor([0, 1]), torch.tensor([1, 2]))
    ref.batch_select_indices(keep)
    assert torch.equal(room.keys, ref.keys)
