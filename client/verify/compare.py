"""The pure rules of result checks: when to check, whom to ask, and when two results disagree.

Kept apart from the checker itself (``client/verify/verifier.py``) so they can be tested, and reasoned
about, without a swarm.

Tolerance. Two honest peers never return bit-identical hidden states: a decode step and a prefill
sum in different orders, bfloat16 rounds the residual stream, nf4 perturbs every weight. For each
position (row) of a window the checker compares the two outputs ``y`` and ``z`` of the same input
``x`` with

    score = |z - y| / (tol * (min(|y - x|, |z - x|) + |x|))        (L2 norms over the hidden size)

and the window disagrees when any row scores above 1. ``tol`` is the sum of the two peers'
tolerances (their errors against exact arithmetic add up; ``pair_tolerance``). The denominator is what an honest peer's
error scales with: the input's norm (rounding the residual stream to the peer's dtype) plus what the
span added to it (rounding and quantization inside the layers). Using the smaller of the two
peers' contributions keeps a cheater from widening its own tolerance by inflating its output.

Calibration (``benchmarks/verification.py --calibrate``): every precision computed decode-by-decode
against a float32 prefill of the embedded trained model, over 400 real tokens and spans of 1 and 3
layers. Largest observed error ratio |z - y| / (min delta + |x|): float32 1e-6, float16 0.0013,
int8 0.0067, bfloat16 0.008, nf4 0.089. The tolerances below are 3 to 4 times those (float32 allows
for TF32 matmuls on GPUs, ~5e-4), nf4 1.7 times its own, so an honest pair scores at most about 0.6.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Collection, Iterable

import torch

from brigade.protocol.records import PeerRecord, newest_per_peer

# Tolerance of one peer by precision: a compute dtype plus, for quantized peers, the quantization's own.
# These are this client's numbers, never a peer's: a record only names its precision, and only the
# names below are accepted. nf4 is 1.7x its calibrated worst case (not 3 to 4x as the others): at 0.3 a
# peer announcing nf4 could leave out a layer that changes the residual by a quarter (measured on the
# embedded model: skipping layer 3, 4 or 5 scores 0.08 to 0.29 per position against float32) and pass
# every check. Against another nf4 peer the pair is checked much tighter (``pair_tolerance``).
DTYPE_TOLERANCE: dict[str, float] = {
    "float32": 5e-3,
    "float16": 1e-2,
    "bfloat16": 3e-2,
}
QUANTIZATION_TOLERANCE: dict[str, float] = {
    "none": 0.0,
    "int8": 3e-2,
    "nf4": 0.15,
}
PRECISION_TOLERANCE: dict[str, float] = {**DTYPE_TOLERANCE, **{k: v for k, v in QUANTIZATION_TOLERANCE.items() if v}}
# A precision this version does not know gets the strictest tolerance, never the loosest: a name a
# peer makes up must not buy it room to cheat. (An honest peer of a newer precision is then checked
# as if it computed in float32; such a swarm needs a client that knows the precision.)
STRICTEST_TOLERANCE = min(DTYPE_TOLERANCE.values())


def known_precision(record: PeerRecord) -> bool:
    """Whether this client has its own tolerance for the record's dtype and quantization."""
    return record.dtype in DTYPE_TOLERANCE and record.quantization in QUANTIZATION_TOLERANCE


def tolerance_of(record: PeerRecord, scale: float = 1.0) -> float:
    """How far this peer's results may honestly stray, as a share of (input + what the span adds)."""
    if not known_precision(record):
        return STRICTEST_TOLERANCE * scale
    return (DTYPE_TOLERANCE[record.dtype] + QUANTIZATION_TOLERANCE[record.quantization]) * scale


# Two peers of the same quantization hold the same weights (quantizing one checkpoint is deterministic):
# only their kernels' rounding differs, so the pair gets this share of one quantization's tolerance, not
# two whole ones. A peer announcing nf4 is then checked tightly whenever another nf4 peer serves its layers.
SHARED_QUANTIZATION_SHARE = 0.25


def pair_tolerance(a: PeerRecord, b: PeerRecord, scale: float = 1.0) -> float:
    """How far two peers' results may honestly be apart (their errors against exact arithmetic add up)."""
    if known_precision(a) and known_precision(b) and a.quantization == b.quantization != "none":
        shared = SHARED_QUANTIZATION_SHARE * QUANTIZATION_TOLERANCE[a.quantization]
        return (DTYPE_TOLERANCE[a.dtype] + DTYPE_TOLERANCE[b.dtype] + shared) * scale
    return tolerance_of(a, scale) + tolerance_of(b, scale)


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

    On top of the stratified pick, every window is also checked with probability ``extra_rate``:
    without it, a peer that saw its block's read-back (it learns of a check when its outputs are
    read) knows the rest of the block is safe and may cheat there for free.
    """

    def __init__(self, rate: float, kind: str = "stratified", rng: random.Random | None = None,
                 extra_rate: float = 0.0):
        if kind not in ("stratified", "random"):
            raise ValueError(f"verify_schedule must be 'stratified' or 'random', not {kind!r}")
        self.rate = rate
        self.extra_rate = extra_rate if rate > 0 else 0.0
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
        extra = self._rng.random() < self.extra_rate  # drawn for every window, so a draw says nothing of the pick
        return offset == self._pick or extra


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
    tolerance (a check is only as sensitive as the looser peer allows: ``tolerance`` may be the pair's
    with the suspect, ``pair_tolerance``); at random among equals.
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
