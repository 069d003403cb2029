"""A session's kept outputs (``keep_outputs``): what it returned, by position, for its client.

Clients that verify or forward ask for them: a replay after a failover reads them back, and a
result check compares them. They are stored in the wire dtype as sent, so what ``History``
returns hashes the same as what was forwarded, and they are paid for like the cache: the session
manager grants pages for them first (``paid_bytes``), and ``write`` never grows the buffer past
what was paid. They are rolled back with the cache and freed with the session.
"""

from __future__ import annotations

import torch

from brigade.protocol.errors import InvalidRequestError


class OutputHistory:
    """Outputs ``[B, positions, H]`` of one session, growing geometrically within what was paid."""

    def __init__(self, batch: int, hidden_size: int, dtype: torch.dtype, paid_bytes: int = 0):
        self._buffer = torch.empty(batch, 0, hidden_size, dtype=dtype)
        self.length = 0
        self.paid_bytes = paid_bytes  # raised by the session manager once the pool granted the pages

    def bytes_for(self, positions: int, dtype: torch.dtype) -> int:
        """What holding ``positions`` positions in ``dtype`` costs."""
        batch, _, hidden = self._buffer.shape
        return batch * positions * hidden * dtype.itemsize

    def paid_positions(self, dtype: torch.dtype) -> int:
        """How many positions in ``dtype`` the paid bytes hold."""
        return self.paid_bytes // max(self.bytes_for(1, dtype), 1)

    def write(self, start: int, output: torch.Tensor) -> None:
        end = start + output.shape[1]
        if start > self.length:
            raise ValueError(f"output at position {start} leaves a gap after {self.length}")
        paid = self.paid_positions(output.dtype)
        if end > paid:  # the step's prepare pays for its outputs first: this is a bug, not a client's error
            raise RuntimeError(f"kept outputs up to position {end} were not paid for ({paid} positions are)")
        if output.dtype != self._buffer.dtype or end > self._buffer.shape[1]:
            size = min(max(end, 2 * self._buffer.shape[1]), paid)
            grown = self._buffer.new_empty(self._buffer.shape[0], size, self._buffer.shape[2], dtype=output.dtype)
            grown[:, : self.length] = self._buffer[:, : self.length]
            self._buffer = grown
        self._buffer[:, start:end] = output
        self.length = end

    def read(self, start: int, end: int) -> torch.Tensor:
        if not 0 <= start < end <= self.length:
            raise InvalidRequestError(f"positions {start}:{end} are not among the {self.length} kept")
        return self._buffer[:, start:end]

    def truncate(self, length: int) -> None:
        """Forgets positions from ``length`` on (a rollback); the buffer, and what it was paid, stay."""
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()
