"""The dashboard's JSON API (``/api/v1/state``): one document with every model, layer and peer.

Times are Unix seconds (the DHT's clock, which is wall-clock time); durations are seconds unless
the name says ``_ms``. Layer ranges are half-open ``[start, end)``. The same schema is served as
OpenAPI at ``/openapi.json`` and described in ``docs/dashboard.md``. Fields are only ever added
within v1, so clients should ignore fields they do not know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

PeerStatus = Literal["online", "leaving", "unreachable", "gone"]
Verdict = Literal["healthy", "broken"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PeerView(_Frozen):
    """One peer of one model, from its signed record and the dashboard's probe of its ``Info`` RPC."""

    peer_id: str
    short_id: str = Field(description="the peer id's last 8 characters, as the page shows it")
    address: str = Field(description="host:port of its gRPC service (a relay's when relay_peer_id is set)")
    start_layer: int
    end_layer: int = Field(description="exclusive")
    dtype: str
    quantization: str
    throughput: float = Field(description="announced decode tokens/s per layer (0 = unmeasured)")
    free_cache_tokens: int = Field(
        description="free KV cache positions: from the probe if it answered, else from the record")
    open_sessions: int | None = Field(description="from the probe; null when it did not answer")
    software_version: str
    protocol_version: str
    announced_state: str = Field(description="state in the record: online | leaving")
    status: PeerStatus = Field(
        description="online: announced online and answered; leaving: draining; unreachable: announced but did "
        "not answer the probe (or answered as another peer); gone: no longer in the DHT (kept for a while)"
    )
    reachable: bool | None = Field(description="answered the last probe; null when it was not probed")
    rtt_ms: float | None = Field(description="round trip of an Info call on an open connection, from the dashboard")
    probe_error: str = Field(description="why the probe failed ('' when it answered)")
    started_at: float = Field(description="when the peer began serving (0 = unknown); uptime = now - started_at")
    last_announced_at: float = Field(description="signed_at of its newest record seen")
    last_seen_at: float = Field(description="end of the last crawl that found its record")
    expires_at: float = Field(description="when its newest record seen expires")
    tls: bool = Field(description="its record carries a TLS certificate")
    relay_peer_id: str


class LayerView(_Frozen):
    """One layer of a model: who can compute it right now (peers with status online)."""

    peers: int
    throughput: float = Field(description="summed announced tokens/s per layer of those peers")
    announced: int = Field(description="peers whose record covers this layer, whatever their status (gone excepted)")


class HistoryPoint(_Frozen):
    t: float
    peers_online: int
    total_throughput: float = Field(description="summed announced throughput of online peers")
    weakest_layer_throughput: float


class ModelView(_Frozen):
    name: str
    num_layers: int = Field(description="of the whole model, as most of its peers announce it")
    verdict: Verdict = Field(description="healthy when every layer has at least one online (reachable) peer")
    layers_covered: int
    gaps: list[tuple[int, int]] = Field(description="half-open ranges of layers no online peer serves")
    min_peers_per_layer: int
    weakest_layer_throughput: float = Field(description="the smallest per-layer summed throughput: the bottleneck")
    total_throughput: float
    peers_total: int = Field(description="peers with a record in the DHT (gone peers not counted)")
    peers_online: int
    peers_unreachable: int
    peers_leaving: int
    records_dropped: int = Field(description="values under this model's key that failed validation in the last crawl")
    read_error: str = Field(description="set when the last crawl could not read this model (peers shown are older)")
    versions: dict[str, int] = Field(description="software version -> number of peers with a record")
    probe_rtt_ms: dict[str, float] = Field(description="quantiles p50, p90, p99 of probe round trips ({} when none)")
    warnings: list[str]
    layers: list[LayerView] = Field(description="one entry per layer, index = layer number")
    peers: list[PeerView]
    history: list[HistoryPoint] = Field(description="oldest first, one point per crawl at most")


class CrawlView(_Frozen):
    source: str = Field(description="what is crawled: the DHT via its initial peers, or a snapshot file")
    period_s: float
    in_progress: bool
    started_at: float | None = Field(description="start of the crawl in progress or of the last one")
    finished_at: float | None = Field(description="end of the last finished crawl")
    duration_s: float | None
    ok: bool | None = Field(description="whether the last finished crawl succeeded; null before the first")
    error: str
    last_success_at: float | None
    crawls: int
    failures: int
    records_seen: int
    records_dropped: int
    peers_probed: int
    models_skipped: int


class DashboardState(_Frozen):
    schema_version: int = SCHEMA_VERSION
    software_version: str = Field(description="the dashboard's brigade version")
    generated_at: float = Field(description="when this document was served (to correct for client clock skew)")
    crawl: CrawlView
    models: list[ModelView]
