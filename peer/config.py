"""The one configuration of a peer process; the CLI builds it, everything else reads it.

A config checks itself when it is made (``__post_init__``), so every way of building one (the
CLI, tests, ``dataclasses.replace``) meets the same rules; errors name the field and its flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from brigade.routing.peer_filter import PeerFilter

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "nf4")
REACHABILITY = ("auto", "direct", "relayed")


@dataclass(frozen=True)
class PeerConfig:
    model: str  # local folder or Hugging Face repo id
    start_layer: int | None = None  # first hosted layer (inclusive); None = choose from the swarm ("auto")
    end_layer: int | None = None  # last hosted layer (exclusive); None = as many as fit in max_memory_bytes
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to bootstrap from
    model_name: str | None = None  # DHT name of the model; derived from `model` when None
    host: str = "127.0.0.1"  # interface the gRPC server binds
    port: int = 0  # gRPC port; 0 = any free port
    announce_host: str | None = None  # address clients should dial; defaults to `host`
    announce_port: int | None = None  # port clients should dial (a proxy or NAT forward); defaults to the bound port
    dht_listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # multiaddrs the DHT node listens on
    identity_path: str | None = None  # Ed25519 key file; a fresh key each run when None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    quantization: str = "none"  # linear weights: none | int8 | nf4 (bitsandbytes)
    max_memory_bytes: int | None = None  # budget for weights + KV cache (+ this process on CPU); None = half of free
    cache_share: float = 0.25  # share of the budget kept for the KV cache when sizing the span
    device: str = "cpu"  # cpu | cuda | cuda:N
    revision: str | None = None  # Hub revision of the checkpoint
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    cache_tokens: int | None = None  # KV cache pool size in positions (one sequence, all hosted layers); None = plan
    cache_page_tokens: int = 64  # allocation granule of the pool, in positions
    max_batch_size: int = 64  # sequences per session
    max_session_length: int = 8192  # positions per sequence a session may ask for
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC message cap, both directions
    max_tensor_bytes: int = 48 * 1024 * 1024  # one decoded tensor, checked before allocation
    session_idle_timeout_s: float = 300.0  # a stream silent this long is closed and its cache freed
    max_admission_wait_s: float = 60.0  # longest a new session may wait for cache pages (client asks up to this)
    announce_period_s: float = 10.0  # seconds between record refreshes
    record_ttl_s: float = 20.0  # records expire this long after the last refresh: a dead peer is gone in 2 periods
    drain_grace_s: float = 20.0  # on SIGTERM, how long open sessions may finish
    insecure: bool = False  # plain-text gRPC and no client tokens: private test swarms only
    # Dial private, loopback and link-local addresses on others' word (probes, next hops, relays)?
    # None = private exactly when the swarm is joined only through such addresses (protocol/targets.py).
    private_swarm: bool | None = None
    max_sessions_per_client: int = 64  # open sessions one client identity may hold here
    client_cache_share: float = 0.25  # share of the KV cache pool one client identity may hold
    max_session_bytes: int | None = None  # input bytes one session may send in all; None = 4x its full cache span
    allowed_clients: frozenset[str] | None = None  # client (and upstream peer) ids allowed here; None = anyone
    blocked_clients: frozenset[str] = frozenset()  # ids refused here
    allowed_peers: frozenset[str] | None = None  # peers whose records it stores, reads, links to; None = any
    blocked_peers: frozenset[str] = frozenset()  # peers never stored, read, forwarded to, nor accepted as upstream
    max_batch_tokens: int = 2048  # positions one pass over the span may compute (decode steps + prefill chunks)
    prefill_chunk_tokens: int = 512  # a longer prefill is computed (and forwarded) in chunks of this many positions
    batch_window_ms: float = 10.0  # cap on a ready step's wait for busy sessions' steps (adaptive below it)
    # One step per pass in fixed 512-position chunks: results never depend on other sessions' load, and a
    # replay on another such peer rebuilds a cache bit for bit (docs/design.md "Batch-invariant mode")
    batch_invariant: bool = False
    forward_timeout_s: float = 10.0  # deadline for reaching the next hop when forwarding
    step_timeout_s: float = 600.0  # longest a step or Forward pass may take, queue wait included (a slow prefill)
    max_queued_work: int = 1024  # compute work items queued at once, all clients together; more are refused
    max_queued_work_per_client: int = 128  # ... and for one client identity
    max_unary_per_client: int = 8  # Forward (and, apart, History) calls one client may have in flight here
    # Balance (docs/routing.md)
    span_length: int | None = None  # with auto layers: how many to host; None = as many as fit in memory
    throughput: str = "auto"  # tokens/s per layer to announce: auto (cached or measured) | eval | DECODE[:PREFILL]
    throughput_cache: str | None = None  # JSON file of past measurements; None = the user cache folder, "" = none
    ping_period_s: float = 30.0  # seconds between round-trip measurements to the next layers' peers; 0 = never
    rebalance_period_s: float = 120.0  # mean seconds between re-checks (jitter ±50%); 0 = never (auto layers only)
    rebalance_min_gain: float = 0.02  # a move must raise the swarm's soft-minimum throughput by this fraction
    move_drain_s: float = 30.0  # a moving peer lets open sessions leave this long, then closes them
    # Reachability and relays (docs/relays.md)
    reachability: str = "auto"  # auto (others dial back; relay if unreachable) | direct (no check) | relayed
    probe_timeout_s: float = 3.0  # how long each prober tries to connect back
    reachability_period_s: float = 600.0  # seconds between re-checks (60 s while unknown); 0 = at start only
    relay_wait_s: float = 10.0  # at start, how long an unreachable peer waits for a relay before announcing anyway
    relayed_backend: str | None = None  # "host:port" relayed connections are handed to; None = this peer's gRPC port
    relay: bool = False  # offer relaying to unreachable peers (only while this peer is reachable itself)
    relay_port: int = 0  # TCP port clients of relayed peers connect to; 0 = any free port
    relay_announce_port: int | None = None  # that port as clients dial it (NAT forward, proxy); None = bound one
    relay_max_peers: int = 16  # relayed peers registered here at once
    relay_max_connections: int = 128  # client connections relayed at once, all relayed peers together
    relay_max_connections_per_peer: int = 32  # ... and for one relayed peer
    relay_max_bytes_per_hour: int = 4 << 30  # bytes relayed per relayed peer per clock hour; 0 = no cap
    # Start-up
    ready_file: str | None = None  # JSON file written (atomically) once the peer serves and is announced; None = none

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field (and its ``brigade peer run`` flag) that is out of range."""
        from brigade.peer.throughput import parse_throughput_option  # torch-heavy: only when a config is made

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(self.dtype in DTYPES, f"dtype (--dtype) must be float32, bfloat16 or float16, got {self.dtype!r}")
        require(self.quantization in QUANTIZATIONS,
                f"quantization (--quant) must be none, int8 or nf4, got {self.quantization!r}")
        if self.start_layer is not None and self.end_layer is not None:
            require(0 <= self.start_layer < self.end_layer,
                    f"layers (--layers) must be START:END with 0 <= START < END, "
                    f"got {self.start_layer}:{self.end_layer}")
        parse_throughput_option(self.throughput)
        require(self.span_length is None or self.span_length >= 1,
                f"span_length (--num-layers) must be at least 1, got {self.span_length}")
        for name, port, flag in (("port", self.port, "--port"), ("relay_port", self.relay_port, "--relay-port")):
            require(0 <= port < 65536, f"{name} ({flag}) must be a port number, got {port}")
        for name, port, flag in (("announce_port", self.announce_port, "--announce-port"),
                                 ("relay_announce_port", self.relay_announce_port, "--relay-announce-port")):
            require(port is None or 0 < port < 65536, f"{name} ({flag}) must be a port number, got {port}")
        require(0 <= self.rebalance_min_gain < 10,
                f"rebalance_min_gain (--rebalance-gain) must be in [0, 10), got {self.rebalance_min_gain}")
        require(self.reachability in REACHABILITY,
                f"reachability (--reachability) must be auto, direct or relayed, got {self.reachability!r}")
        require(self.relay_max_peers >= 1 and self.relay_max_connections >= 1,
                "relay_max_peers and relay_max_connections (--relay-max-peers, --relay-max-connections) must be "
                "at least 1")
        require(self.relay_max_bytes_per_hour >= 0,
                f"relay_max_bytes_per_hour (--relay-max-bytes) must be >= 0, got {self.relay_max_bytes_per_hour}")
        require(self.max_session_length >= 1,
                f"max_session_length (--max-session-length) must be at least 1, got {self.max_session_length}")
        require(self.client_cache_share > 0,
                f"client_cache_share (--client-cache-share) must be positive, got {self.client_cache_share}")
        require(self.cache_page_tokens > 0, f"cache_page_tokens must be positive, got {self.cache_page_tokens}")
        require(self.step_timeout_s > 0, f"step_timeout_s (--step-timeout) must be positive, got {self.step_timeout_s}")
        require(min(self.max_queued_work, self.max_queued_work_per_client, self.max_unary_per_client) >= 1,
                "max_queued_work, max_queued_work_per_client and max_unary_per_client must be at least 1")
        require(self.cache_tokens is None or self.cache_tokens > 0,
                f"cache_tokens (--cache-tokens) must be positive, got {self.cache_tokens}")

    @property
    def allows_private_targets(self) -> bool:
        """Whether this peer dials non-public addresses that records or requests name (a private swarm)."""
        if self.private_swarm is not None:
            return self.private_swarm
        from brigade.protocol.targets import joins_privately

        return joins_privately(self.initial_peers, (self.host, self.announce_host or self.host))

    @property
    def peer_filter(self) -> PeerFilter:
        """The peer allowlist and blocklist as the one filter the DHT node, readers and servicer apply."""
        return PeerFilter(self.allowed_peers, self.blocked_peers)

    @property
    def num_layers(self) -> int:
        if self.start_layer is None or self.end_layer is None:
            raise ValueError("the span is not chosen yet")
        return self.end_layer - self.start_layer
