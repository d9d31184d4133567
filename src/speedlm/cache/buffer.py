"""`TokenBuffer`: per-token entries kept by a retention policy. One mechanism serves KV caches
(keys and values), convolution states (the last kernel - 1 inputs) and the cached inputs of
long convolutions.

Entries are tensors with time at dim -2 ((B, H, L, Dh) keys, (B, L, D) inputs); each slot also
has an absolute position. Positions are kept as one int (slot j holds `pos_start + j`) while
they are contiguous, which is the common case and costs nothing; they become an explicit
(B, L) tensor once explicit per-row positions arrive or the policy keeps a non-suffix
selection. Positions are index metadata, not state: `nbytes` counts only the entries.

Storage: for inference the entries live in preallocated buffers that new tokens are written
into, so a decoded token costs O(1) copies instead of re-concatenating the history. When a
buffer runs out it is reallocated at twice what is retained (amortised O(1) per token; for a
window, capacity stays about 2 x window). Under autograd the buffer concatenates instead,
because in-place writes would invalidate tensors saved for the backward pass. Reallocation
and compaction always make fresh tensors, so views handed out earlier stay valid.

A policy that keeps a few first slots and a suffix (attention sinks + a window: `HeadAndTail`)
would otherwise compact on every token. Instead the buffer moves the head forward over the
evicted slots, in place: O(head) copies per call. The move is deferred to the next read or
write, because the view the current call reads still needs the slots it overwrites; such a
cache's views therefore stay valid until its next call, not for ever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedlm.cache.base import LayerCache

_MIN_CAPACITY = 64


def token_positions(positions: int | torch.Tensor, t: int, device) -> torch.Tensor:
    """(B|1, T) positions of T tokens from an int start or a tensor."""
    if isinstance(positions, int):
        return torch.arange(positions, positions + t, device=device)[None]
    return positions


@dataclass(frozen=True)
class HeadAndTail:
    """A policy's selection: the first `head` slots and every slot from `tail` on (tail >= head)."""

    head: int
    tail: int


def _select(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slots `idx` along dim -2: idx (L',) shared by every row, or (B, L') per row."""
    if idx.dim() == 1:
        return t.index_select(-2, idx)
    shape = (idx.shape[0],) + (1,) * (t.dim() - 3) + (idx.shape[1], 1)
    return t.gather(-2, idx.view(shape).expand(*t.shape[:-2], idx.shape[1], t.shape[-1]))


class TokenBuffer(LayerCache):
    def __init__(self, policy, n_entries: int):
        self.policy = policy
        self.n_entries = n_entries
        self._bufs: list[torch.Tensor] | None = None  # entries, then (B, cap, 1) positions if explicit
        self._begin = 0  # retained slots are buf[..., begin:end, :]
        self._end = 0
        self._pos_start: int | None = 0  # contiguous positions: slot j holds pos_start + j; None: explicit
        self._head = 0  # HeadAndTail: the first _head slots move forward over the _drop evicted
        self._drop = 0  # slots after them at the next read or write (see the module docstring)
        self.reallocations = 0
        self._reserved = 0  # slots to allocate at least (`reserve`): what the policy retains of a known length

    # ----- reading -----
    @property
    def length(self) -> int:
        return self._end - self._begin - self._drop

    def entries(self) -> list[torch.Tensor]:
        self._settle()
        if self._bufs is None:
            return []
        begin, n = self._begin, self._end - self._begin
        return [b.narrow(-2, begin, n) for b in self._bufs[: self.n_entries]]

    def positions(self) -> int | torch.Tensor:
        """Positions of the retained slots: an int start (contiguous) or a (B, L) tensor."""
        if self._pos_start is not None:
            return self._pos_start
        self._settle()
        return self._bufs[-1][:, self._begin : self._end, 0]

    def tensors(self) -> list[torch.Tensor]:
        return self.entries()

    def next_position(self) -> int:
        """The position after the retained slots (contiguous mode; 0 when empty)."""
        if self._pos_start is not None:
            return self._pos_start + self.length
        return int(self.positions().max()) + 1 if self.length else 0

    # ----- writing -----
    def extend(self, *new: torch.Tensor, positions: int | torch.Tensor | None = None):
        """Append entries for T new tokens at `positions` (int start or (B|1, T) tensor; default:
        right after the retained ones).

        Returns (entries: retained + new, positions of those slots): everything the new
        tokens may read. Then keeps only what the policy retains for later calls."""
        assert len(new) == self.n_entries
        b, t = new[0].shape[0], new[0].shape[-2]
        if positions is None:
            positions = self.next_position()
        contiguous_next = self._pos_start is not None and isinstance(positions, int) and (
            self.length == 0 or positions == self._pos_start + self.length
        )
        if contiguous_next:
            if self.length == 0:
                self._pos_start = positions
            extra = []
        else:
            if self._pos_start is not None:  # switch to explicit positions
                self._materialise_positions(b, new[0].device)
            extra = [token_positions(positions, t, new[0].device).expand(b, t)[..., None].to(torch.long)]
        items = list(new) + extra
        if torch.is_grad_enabled() and any(x.requires_grad for x in new):
            self._concat(items)
        else:
            self._append(items)
        out, pos = self.entries(), self.positions()
        self._retain(self._keep(pos))
        return out, pos

    def _keep(self, positions):
        """The policy's selection (KV caches also hand it the slots' marks)."""
        return self.policy.keep(self.length, positions)

    def _materialise_positions(self, b: int, device) -> None:
        n = self.length
        pos = (self._pos_start + torch.arange(n, device=device)).expand(b, n)[..., None]
        if self._bufs is not None:
            full = pos.new_zeros(b, self._bufs[0].shape[-2], 1)
            full[:, self._begin : self._end] = pos
            self._bufs.append(full)
        self._pos_start = None

    def _concat(self, items: list[torch.Tensor]) -> None:
        self._settle()
        if self.length:
            items = [torch.cat([old[..., self._begin : self._end, :], x], dim=-2) for old, x in zip(self._bufs, items)]
        self._bufs, self._begin, self._end = items, 0, items[0].shape[-2]

    def _append(self, items: list[torch.Tensor]) -> None:
        self._settle()
        t = items[0].shape[-2]
        bufs = self._bufs
        if bufs is None or len(bufs) != len(items) or self._end + t > bufs[0].shape[-2] or bufs[0].requires_grad:
            self._reallocate(items, needed=self.length + t)
        for buf, x in zip(self._bufs, items):
            buf.narrow(-2, self._end, t).copy_(x)
        self._end += t

    def reserve(self, tokens: int) -> None:
        # what the policy retains of `tokens` tokens, plus one call's worth of slack for a window
        # that briefly holds its new tokens before evicting
        self._reserved = self.policy.retained(tokens) + 1

    def _reallocate(self, like: list[torch.Tensor], needed: int) -> None:
        capacity = max(_MIN_CAPACITY, 2 * needed, self._reserved)
        if self._reserved and self._bufs is not None and needed <= self._bufs[0].shape[-2]:
            capacity = self._bufs[0].shape[-2]  # reserved: compact into the same shape (a window's steady state)
        n = self.length
        old = [] if self._bufs is None else [b[..., self._begin : self._end, :] for b in self._bufs]
        bufs = []
        for i, x in enumerate(like):
            buf = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
            if n and i < len(old):
                buf[..., :n, :] = old[i]
            bufs.append(buf)
        self._bufs, self._begin, self._end = bufs, 0, n
        self.reallocations += 1

    def _retain(self, keep) -> None:
        if isinstance(keep, HeadAndTail):
            if keep.head == 0 or keep.tail <= keep.head:  # nothing between them: a suffix
                keep = slice(keep.tail if keep.head == 0 else 0, self.length)
            else:
                if self._pos_start is not None:  # the kept slots' positions are no longer contiguous
                    self._materialise_positions(self._bufs[0].shape[0], self._bufs[0].device)
                if not self._bufs[0].requires_grad:
                    self._head, self._drop = keep.head, keep.tail - keep.head
                    return
                device = self._bufs[0].device
                keep = torch.cat([torch.arange(keep.head, device=device), torch.arange(keep.tail, self.length, device=device)])
        if isinstance(keep, slice):
            start = keep.start or 0
            assert keep.stop == self.length and start >= 0, "a slice policy keeps a suffix"
            self._begin += start
            if self._pos_start is not None:
                self._pos_start += start
            self._shrink_if_oversized()
            return
        # a non-suffix selection: compact into fresh tensors (earlier views stay valid)
        if self._pos_start is not None:
            self._materialise_positions(self._bufs[0].shape[0], keep.device)
        kept = [_select(b[..., self._begin : self._end, :], keep) for b in self._bufs]
        grad = any(k.requires_grad for k in kept)
        if grad:
            self._bufs, self._begin, self._end = kept, 0, kept[0].shape[-2]
        else:
            self._begin = self._end = 0
            self._bufs = None
            self._reallocate(kept, needed=kept[0].shape[-2])
            for buf, x in zip(self._bufs, kept):
                buf[..., : x.shape[-2], :] = x
            self._end = kept[0].shape[-2]

    def _settle(self) -> None:
        """Carry out a deferred HeadAndTail: move the head forward over the dropped slots."""
        if not self._drop:
            return
        head, drop = self._head, self._drop
        for buf in self._moved_with_head():
            src = buf.narrow(-2, self._begin, head).clone()  # it may overlap its destination
            buf.narrow(-2, self._begin + drop, head).copy_(src)
        self._begin += drop
        self._drop = 0
        self._shrink_if_oversized()

    def _moved_with_head(self) -> list[torch.Tensor]:
        """The buffers whose head a HeadAndTail move copies: the entries and explicit positions."""
        return self._bufs

    def _shrink_if_oversized(self) -> None:
        # after a long prefill into a window cache, give back what the policy will never use
        if self._bufs is None or self._bufs[0].requires_grad:
            return
        if self._bufs[0].shape[-2] > max(_MIN_CAPACITY, 4 * (self.length + 1), self._reserved):
            self._reallocate(self._bufs, needed=self.length + 1)

    def detach(self) -> None:
        if self._bufs is not None:
            self._bufs = [b.detach() for b in self._bufs]

    def allocated_bytes(self) -> int:
        """Bytes reserved by the entry buffers (at most ~2x the retained entries, or 64 rows)."""
        bufs = [] if self._bufs is None else self._bufs[: self.n_entries]
        return sum(b.numel() * b.element_size() for b in bufs)
