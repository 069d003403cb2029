"""The one configuration of a client; ``from_pretrained`` keyword arguments override its fields."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from brigade.routing.peer_filter import PeerFilter


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to bootstrap from
    model_name: str | None = None  # DHT name of the model; derived from the model path when None
    step_timeout_s: float = 120.0  # deadline for one hop's answer to a prefill or replay step
    decode_timeout_floor_s: float = 1.5  # a decode step's deadline is never shorter than this
    decode_timeout_factor: float = 10.0  # ... and otherwise this many times the hop's typical step time
    open_timeout_s: float = 10.0  # deadline for a hop to open a session (on top of cache_wait_s)
    cache_wait_s: float = 5.0  # how long a full peer may keep a new session waiting for cache memory
    quantizations: tuple[str, ...] | None = None  # peers' quantizations to use ("none", "int8", "nf4"); None = any
    retry_budget_s: float = 60.0  # how long one step may spend recovering from failed hops
    max_attempts: int = 12  # failed hops one step may recover from before giving up
    ban_base_s: float = 2.0  # first ban of a failed peer; doubles with each failure
    ban_max_s: float = 60.0  # longest ban
    route_wait_s: float = 30.0  # how long to wait for every layer to have a live peer
    records_max_age_s: float = 2.0  # reuse a DHT read this recent instead of asking again
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message cap, both directions
    # bytes of activations in one message to or from a peer (peers refuse tensors over 48 MiB by default):
    # longer steps, replays, re-runs and History reads go in pieces (client/chunks.py)
    max_step_bytes: int = 32 * 1024 * 1024
    wire_dtype: str = "float32"  # dtype of activations on the wire (float32 keeps results exact)
    dht_startup_timeout_s: float = 30.0  # bound on starting the client's DHT node
    identity_path: str | None = None  # Ed25519 key file of this client (created on first run); None = a fresh key
    allow_insecure: bool = False  # accept peers without TLS (private --insecure test swarms only)
    forwarding: bool = True  # peers send outputs straight to the next hop (falls back per pair when they cannot)
    pipeline_prefill: bool = True  # pass each prefill chunk on as soon as it is computed
    # Route only through peers in batch-invariant mode (peer --batch-invariant) and replay every original step
    # as its own message: a failover then rebuilds the lost cache bit for bit (slower replays; docs/design.md)
    batch_invariant: bool = False
    verify_rate: float = 0.05  # share of finished windows re-checked on another peer serving the same layers
    verify_window: int = 16  # decode steps per hop that make one window
    verify_schedule: str = "stratified"  # "stratified": one check in each block of 1/verify_rate windows; "random"
    # share of windows checked at random on top of the stratified schedule (a peer that saw its block's check
    # does not know the rest of the block is safe)
    verify_extra_rate: float = 0.02
    verify_tolerance_scale: float = 1.0  # multiplies every precision's tolerance (client/verify/compare.py)
    verify_max_pending: int = 4  # due windows waiting for the session's check task; more are skipped (counted)
    verify_timeout_s: float = 120.0  # bound on one hop's check (read-backs, re-runs, comparisons)
    allowed_peers: Iterable[str] | None = None  # use only these peer ids (private swarms); None = any
    blocked_peers: Iterable[str] = frozenset()  # never use these peer ids, even when allowed
    route_slack: float = 0.05  # next hops within this fraction of the fastest are drawn at random (spreads load)
    bulk_route_slack: float = 0.25  # the same for throughput-bound work (big batches, long prefills)
    bulk_batch_size: int = 8  # sessions with this many sequences count as throughput-bound
    bulk_prefill_tokens: int = 4096  # ... and so do prefills/replays of this many positions (all sequences)
    route_pings: int = 16  # peers not measured yet that one route search may ping first
    ping_timeout_s: float = 1.0  # deadline of each of those pings (two calls: connect, then the timed one)

    def __post_init__(self) -> None:
        # Lists from from_pretrained keywords or a config file become frozensets; a string that is no
        # peer id fails here, at start-up, rather than silently admitting nobody.
        checked = PeerFilter.of(self.allowed_peers, self.blocked_peers)
        object.__setattr__(self, "allowed_peers", checked.allow)
        object.__setattr__(self, "blocked_peers", checked.block)

    @property
    def peer_filter(self) -> PeerFilter:
        """The allowlist and blocklist as the one filter every reader of records applies."""
        return PeerFilter(self.allowed_peers, frozenset(self.blocked_peers))  # type: ignore[arg-type]
