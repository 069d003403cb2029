"""The pure rules of result checks: when to check, whom to ask, and when two results disagree.

Kept apart from the checker itself (``client/verify/verifier.py``) so they can be tested, and reasoned
about, without a swarm.

Tolerance. Two honest peers never return bit-identical hidden states: a decode step and a prefill
sum in different orders, bfloat16 rounds the residual stream, nf4 perturbs every weight. For each
position (row) of a window the checker compares the two outputs ``y`` and ``z`` of the same input
``x`` with

    score = |z - y| / (tol * (min(|y - x|, |z - x|) + |x|))        (L2 norms over the hidden size)

and the window disagrees when any row scores above 1. ``tol`` is the sum of the two peers'
tolerances (their errors against exact arithmetic add up). The denominator is what an honest peer's
error scales with: the input's norm (rounding the residual stream to the peer's dtype) plus what the
span added to it (rounding and quantization inside the layers). Using the smaller of the two
peers' contributions keeps a cheater from widening its own tolerance by inflating its output.

Calibration (``benchmarks/verification.py --calibrate``): every precision computed decode-by-decode
against a float32 prefill of the embedded trained model, over 400 real tokens and spans of 1 and 3
layers. Largest observed error ratio |z - y| / (min delta + |x|): float32 1e-6, float16 0.0013,
int8 0.0067, bfloat16 0.008, nf4 0.089. The tolerances below are 3 to 4 times those (float32 allows
for TF32 matmuls on GPUs, ~5e-4), so an honest pair scores at most about a quarter of the way to 1.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Collection, Iterable

import torch

from brigade.protocol.records import PeerRecord, newest_per_peer

# Tolerance of one peer by precision: a compute dtype plus, for quantized peers, the quantization's own.
PRECISION_TOLERANCE: dict[str, float] = {
    "float32": 5e-3,
    "float16": 1e-2,
    "bfloat16": 3e-2,
    "int8": 3e-2,
    "nf4": 0.3,
}
UNKNOWN_TOLERANCE = max(PRECISION_TOLERANCE.values())  # a precision this version does not know: the loosest


def tolerance_of(record: PeerRecord, scale: float = 1.0) -> float:
    """How far this peer's results may honestly stray, as a share of (input + what the span adds)."""
    tolerance = PRECISION_TOLERANCE.get(record.dtype, UNKNOWN_TOLERANCE)
    if record.quantization != "none":
        tolerance += PRECISION_TOLERANCE.get(record.quantization, UNKNOWN_TOLERANCE)
    return tolerance * scale


def precision_of(record: PeerRecord) -> str:
    return record.dtype if record.quantization == "none" else f"{record.quantization}/{record.dtype}"


def disagreement(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, tolerance: float) -> float:
    """The window's score (above 1: ``y`` and ``z`` disagree); ``x, y, z``: [B, T, H], ``valid``: [B, T]."""
    x, y, z = x.float(), y.float(), z.float()
    gap = (z - y).norm(dim=-1)  # [B, T]
    added = torch.minimum((y - x).norm(dim=-1), (z - x).norm(dim=-1))
    allowed = tolerance * (added + x.norm(dim=-1))
    ratio = gap / allowed.clamp_min(torch.finfo(torch.float32).tiny)
    ratio = torch.where(valid, ratio, torch.zeros_like(ratio))
    return float(ratio.max()) if ratio.numel() else 0.0


def valid_rows(pad_lengths: list[int], start: int, end: int) -> torch.Tensor:
    """[B, end - start]: positions that are not left padding (padding outputs are never used)."""
    positions = torch.arange(start, end)[None, :]
    return positions >= torch.tensor(pad_lengths)[:, None]


class WindowSchedule:
    """Which finished windows to check, at ``rate`` of them.

    ``stratified``: exactly one window at a random place in each block of ``round(1 / rate)``
    windows, so every hop is checked ``n * rate`` times in ``n`` windows, never fewer: a peer that
    cheats on every window is checked 3 times in 60 at 5%. ``random``: each window on its own with
    probability ``rate`` (memoryless: having seen one check tells a peer nothing of the next, but a
    run of 60 windows goes unchecked 4.6% of the time at 5%).
    """

    def __init__(self, rate: float, kind: str = "stratified", rng: random.Random | None = None):
        if kind not in ("stratified", "random"):
            raise ValueError(f"verify_schedule must be 'stratified' or 'random', not {kind!r}")
        self.rate = rate
        self.kind = kind
        self.block = max(1, round(1 / rate)) if rate > 0 else 0
        self._rng = rng or random.SystemRandom()  # unpredictable to peers
        self._block_index = -1
        self._pick = 0

    def due(self, window: int) -> bool:
        """Whether window ``window`` (0, 1, 2, ... in order) is checked."""
        if self.rate <= 0:
            return False
        if self.rate >= 1:
            return True
        if self.kind == "random":
            return self._rng.random() < self.rate
        block_index, offset = divmod(window, self.block)
        if block_index != self._block_index:
            self._block_index = block_index
            self._pick = self._rng.randrange(self.block)
        return offset == self._pick


def host_of(address: str) -> str:
    """``"10.0.0.7:5000"`` -> ``"10.0.0.7"``, ``"[::1]:5000"`` -> ``"::1"``."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def network_of(host: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) a host is in: peers there likely share an operator; names stay as they are."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def closeness(a: PeerRecord, b: PeerRecord) -> int:
    """2: same host, 1: same network, 0: apart (what an independent check wants)."""
    host_a, host_b = host_of(a.address), host_of(b.address)
    if host_a == host_b:
        return 2
    return 1 if network_of(host_a) == network_of(host_b) else 0


def choose_checker(
    records: Iterable[PeerRecord],
    layers: tuple[int, int],
    against: Collection[PeerRecord],
    exclude: Collection[str],
    busy: Collection[str],
    tolerance: Callable[[PeerRecord], float],
    rng: random.Random,
) -> PeerRecord | None:
    """A peer to re-run ``layers`` on, independent of the peers in ``against`` (None: nobody else serves them).

    In order of preference: furthest from every peer in ``against`` (another network, then another
    host), not on the session's route (``busy``: the check should not slow it), the tightest
    tolerance (a check is only as sensitive as the looser peer allows); at random among equals.
    """
    newest = newest_per_peer(records)
    avoid = {record.peer_id for record in against} | set(exclude)
    candidates = [record for record in newest.values()
                  if record.state == "online" and record.spans(*layers) and record.peer_id not in avoid]
    if not candidates:
        return None

    def rank(record: PeerRecord) -> tuple[int, bool, float]:
        near = max((closeness(record, other) for other in against), default=0)
        return near, record.peer_id in busy, tolerance(record)

    best = min(rank(record) for record in candidates)
    return rng.choice([record for record in candidates if rank(record) == best])
