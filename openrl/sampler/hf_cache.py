"""The transformers engine's running KV cache: each layer's keys and values are a window onto a
buffer with free columns to its right, so a decode step writes its new column in place.

transformers' `DynamicLayer` concatenates on every `update`: each decode step copied every
layer's whole cache (rows x width), so a step's cost grew with the cache twice, once for
attention reading it and once for the copy. At 64 rows x 1,024 tokens of Qwen3-8B (about 9.7 GB
of bf16 KV) each step's copy moves twice the bytes its attention reads (arithmetic, not a GPU
measurement; bench/kv_cache.py measures it on CPU against a copy per step).

`RoomLayer` keeps a buffer `[row capacity, heads, capacity, dim]` and shows `keys`/`values` as
the view `[:rows, :, start:end]`. There is room on two sides:
- columns: `update` writes into `[end:end + n]` while there is room, and only then copies the
  window into a new buffer (room: half the width, at least `MIN_ROOM` columns, never past
  `horizon`, the widest the window can get: its rows' prompt + max_tokens), so a row's whole
  generation costs a few copies, not one per token. Cutting leading columns (the scheduler's
  `_trim`) is a view of the same buffer and keeps the room.
- rows: `append` (a request's rows joining) writes the new rows after the others, and widens
  the window to the left for a longer prompt, in place while the buffer has the rows and the
  columns (row room: half the rows, at least `MIN_ROOM`, never past `max_rows`, the engine's
  batch); `keep_rows` (rows leaving) moves only the rows that change place. So neither copies
  the rows that stay, where transformers' layer copied the whole cache for each.
Nothing the window shows was left by another row: joined buffers start at zeros, and the
columns `append` exposes (left padding of the new rows, the old rows' new leading columns)
are zeroed first; the columns right of the window are written by `update` before it shows
them. So one tenant's row never sees another's stale keys (a NaN there would reach its
output through the attention, masked or not).

Anything that replaces `keys`/`values` with a tensor that is not such a view (transformers'
own `crop`, `batch_repeat_interleave`) is still correct: the next `update` copies it into a
new buffer with room.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 16  # columns, and rows


def _room(need: int, limit: int | None) -> int:
    """A capacity for `need`: half as much again, at least MIN_ROOM more, never past `limit`
    (unless `need` is: then exactly `need`)."""
    return need if limit is None else max(need, min(limit, need + max(MIN_ROOM, need // 2)))


class RoomLayer(DynamicLayer):
    def __init__(self, horizon: int, max_rows: int | None = None):
        super().__init__()
        self.horizon = horizon  # the window never gets wider than this: the room stops there
        self.max_rows = max_rows  # nor has more rows than this (None: no row room)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._shown: tuple | None = None  # (keys, values, start) as _show left them: _start's fast path

    @classmethod
    def joined(cls, layers: list[DynamicLayer], width: int, horizon: int, max_rows: int | None = None) -> RoomLayer:
        """The rows of `layers` in order, each left-padded to `width` columns (one copy of each)."""
        layer = cls(horizon, max_rows)
        layer.device, layer.is_initialized = layers[0].keys.device, True
        layer._place([x.keys for x in layers], [x.values for x in layers], width, need=width)
        return layer

    def _place(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int, need: int) -> None:
        """New buffers holding `keys`/`values` stacked by rows, right-aligned to `width` columns
        (zeros before), with room for `need` columns or more."""
        rows = sum(k.shape[0] for k in keys)
        shape = (_room(rows, self.max_rows), keys[0].shape[1], _room(need, self.horizon), keys[0].shape[3])
        self._k, self._v = keys[0].new_zeros(shape), values[0].new_zeros(shape)
        at = 0
        for k, v in zip(keys, values, strict=True):
            self._k[at : at + k.shape[0], :, width - k.shape[2] : width] = k
            self._v[at : at + k.shape[0], :, width - v.shape[2] : width] = v
            at += k.shape[0]
        self._show(rows, 0, width)

    def _start(self) -> int | None:
        """Where the window starts in the buffer (its rows from the first), or None if
        keys/values are not such a window of it."""
        if self._shown is not None and self._shown[0] is self.keys and self._shown[1] is self.values:
            return self._shown[2]
        start = None
        if all(
            buf is not None
            and view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and (view.shape[1], view.shape[3]) == (buf.shape[1], buf.shape[3])
            and view.shape[0] <= buf.shape[0]
            and view.stride() == buf.stride()
            for view, buf in ((self.keys, self._k), (self.values, self._v))
        ):
            start, rest = divmod(self.keys.storage_offset() - self._k.storage_offset(), self._k.stride(2))
            same = self.values.storage_offset() - self._v.storage_offset() == start * self._v.stride(2)
            start = start if rest == 0 and same and start + self.keys.shape[2] <= self._k.shape[2] else None
        if start is None:  # keys/values were replaced (not by this class): the buffer is no longer theirs
            self._k = self._v = self._shown = None
        return start

    def _show(self, rows: int, start: int, end: int) -> None:
        self.keys, self.values = self._k[:rows, :, start:end], self._v[:rows, :, start:end]
        self._shown = (self.keys, self.values, start)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, (rows, _, width, _) = key_states.shape[-2], self.keys.shape
        start = self._start()
        if start is None or start + width + n > self._k.shape[2]:
            self._place([self.keys], [self.values], width, need=width + n)
            start = 0
        end = start + width
        self._k[:rows, :, end : end + n] = key_states
        self._v[:rows, :, end : end + n] = value_states
        self._show(rows, start, end + n)
        return self.keys, self.values

    def append(self, new: DynamicLayer, width: int, horizon: int) -> RoomLayer:
        """This layer's rows, then `new`'s, all right-aligned to `width` (>= both widths)
        columns: in place where the buffer has the rows and the columns (only the new rows and
        the exposed padding are written), else a new layer joining the two."""
        self.horizon = horizon
        start, (rows, _, w, _), (n, _, w_new, _) = self._start(), self.keys.shape, new.keys.shape
        if start is None or rows + n > self._k.shape[0] or start < width - w:
            return RoomLayer.joined([self, new], width, horizon, self.max_rows)
        end, start = start + w, start - (width - w)
        for buf, part in ((self._k, new.keys), (self._v, new.values)):
            buf[:rows, :, start : end - w].zero_()  # the old rows' new leading columns
            buf[rows : rows + n, :, start : end - w_new].zero_()  # the new rows' left padding
            buf[rows : rows + n, :, end - w_new : end] = part
        self._show(rows + n, start, end)
        return self

    def keep_rows(self, keep: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Keep rows `keep` (row i becomes old row keep[i]), where `dst` are the i with
        keep[i] != i and `src` their keep[i]: only those rows' windows are copied."""
        start, width = self._start(), self.keys.shape[2]
        if start is None:
            super().batch_select_indices(keep)
            return
        if len(dst):
            for buf in (self._k, self._v):
                buf[dst, :, start : start + width] = buf[src, :, start : start + width]  # gathered, then written
        self._show(len(keep), start, start + width)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`: the window and its room, copied once."""
        start, width = self._start(), self.keys.shape[-2]
        if start is None:
            super().batch_select_indices(indices)
            return
        self._k = self._k[:, :, start:].index_select(0, indices)
        self._v = self._v[:, :, start:].index_select(0, indices)
        self._show(len(indices), 0, width)

    @property
    def capacity(self) -> int:
        """Columns in the buffer (the window plus its room, plus cut columns before it)."""
        return 0 if self._k is None else self._k.shape[2]

    @property
    def row_capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[0]
