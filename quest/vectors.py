"""Teacher feature vectors for k-means: a bounded uniform sample of a stream of batches
(`VectorSample`), and the gather of every rank's variable-size part to rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist


class VectorSample:
    """A uniform random sample without replacement of at most `capacity` rows (0 = every row) of a
    stream of batches: every row draws a random key and the rows with the smallest keys are kept.

    Rows are copied into preallocated blocks, never appended to one growing tensor (that copies
    everything kept so far on every batch: quadratic). With a capacity there is one block of
    `capacity` rows (memory is only committed as rows are written); once it is full, the rows of a
    batch whose keys beat kept ones take their places: memory stays capacity + one batch. Without,
    blocks of BLOCK_BYTES are joined once, when `rows` is read, each freed as soon as it is copied:
    the peak is every row plus one block, not twice every row.
    """

    BLOCK_BYTES = 32 << 20  # above glibc's largest mmap threshold: a freed block leaves the process

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.g = capacity, generator
        self.seen = 0
        self._rows: list[torch.Tensor] = []  # blocks, every one full but the last
        self._keys: list[torch.Tensor] = []
        self._fill = 0  # rows written into the last block

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        # float64 keys: float32 ones tie among millions of rows
        keys = torch.rand(rows.shape[0], generator=self.g, dtype=torch.float64)
        self.seen += rows.shape[0]
        while rows.shape[0]:
            if not self._rows or (not self.capacity and self._fill == self._rows[-1].shape[0]):
                n = self.capacity or max(1, self.BLOCK_BYTES // (4 * rows.shape[1]))
                self._rows.append(rows.new_empty(n, rows.shape[1]))
                self._keys.append(keys.new_empty(n))
                self._fill = 0
            room = self._rows[-1].shape[0] - self._fill
            if room == 0:  # the sample is full: the rest compete for its places
                self._replace(rows, keys)
                return
            n = min(room, rows.shape[0])
            self._rows[-1][self._fill : self._fill + n] = rows[:n]
            self._keys[-1][self._fill : self._fill + n] = keys[:n]
            self._fill += n
            rows, keys = rows[n:], keys[n:]

    def _replace(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Keep the `capacity` smallest keys of the full sample and this batch, in place."""
        kept_rows, kept_keys = self._rows[0], self._keys[0]
        better = keys < kept_keys.max()
        if not better.any():
            return
        rows, keys = rows[better], keys[better]
        keep = torch.cat([kept_keys, keys]).topk(self.capacity, largest=False, sorted=False).indices
        entering = keep[keep >= self.capacity] - self.capacity
        leaving = torch.ones(self.capacity, dtype=torch.bool)
        leaving[keep[keep < self.capacity]] = False
        slots = leaving.nonzero().squeeze(1)
        kept_rows[slots], kept_keys[slots] = rows[entering], keys[entering]

    def _join(self) -> None:
        if len(self._rows) > 1:
            self._rows = [_joined(self._rows, self._fill)]
            self._keys = [_joined(self._keys, self._fill)]
            self._fill = self._rows[0].shape[0]

    @property
    def rows(self) -> torch.Tensor | None:
        """The kept rows, N×C float32 (None before any)."""
        self._join()
        return self._rows[0][: self._fill] if self._rows else None

    @property
    def keys(self) -> torch.Tensor:
        """The random key of each kept row."""
        self._join()
        return self._keys[0][: self._fill] if self._keys else torch.empty(0, dtype=torch.float64)

    def take(self, n: int) -> torch.Tensor:
        """n rows of the sample in random-key order (still a uniform sample)."""
        order = self.keys.argsort()[:n]
        return self.rows[order]


def _joined(blocks: list[torch.Tensor], fill: int) -> torch.Tensor:
    """The blocks' rows as one tensor (the last holds `fill`). Emptying the list frees each block
    once copied: the peak is every row plus one block, where torch.cat holds every row twice."""
    sizes = [b.shape[0] for b in blocks[:-1]] + [fill]
    out = blocks[0].new_empty(sum(sizes), *blocks[0].shape[1:])
    blocks.reverse()
    start = 0
    for n in sizes:
        out[start : start + n] = blocks.pop()[:n]
        start += n
    return out


def gather_sizes(n: int, world: int, device) -> list[int]:
    """Every rank's row count, on every rank."""
    if world == 1:
        return [n]
    mine = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def gather_to_main(x: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """The ranks' rows (sizes[r] of them on rank r) concatenated in rank order on rank 0, None
    elsewhere (not on every rank: the matrix can be large). dist.gather wants equal shapes: every
    part is padded to the largest and trimmed on rank 0."""
    if len(sizes) == 1:
        return x
    pad = max(sizes) - x.shape[0]
    part = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x.contiguous()
    parts = [torch.empty_like(part) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(part, parts, dst=0)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]) if parts is not None else None
