"""The dashboard's state in Prometheus text format (``/metrics``).

prometheus_client writes the exposition format (escaping of label values that come from peer
records, HELP and TYPE lines); the figures are the last crawl's, rendered once per crawl, so a
scrape costs nothing. Probe latency is a gauge with a ``quantile`` label because the quantiles are
computed over one crawl's probes, not accumulated by a live summary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from brigade.dashboard.schema import CrawlView, ModelView

_STATUSES = ("online", "leaving", "unreachable", "gone")
_QUANTILE_LABELS = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


def _families(models: Sequence[ModelView], crawl: CrawlView) -> list[Metric]:
    peers = GaugeMetricFamily("brigade_model_peers", "Peers of a model by status.", labels=["model", "status"])
    layers = GaugeMetricFamily("brigade_model_layers", "Layers of the whole model.", labels=["model"])
    covered = GaugeMetricFamily("brigade_model_layers_covered", "Layers with at least one online peer.",
                                labels=["model"])
    healthy = GaugeMetricFamily("brigade_model_healthy", "1 when every layer has an online peer.", labels=["model"])
    min_peers = GaugeMetricFamily("brigade_model_min_peers_per_layer", "Online peers of the least-served layer.",
                                  labels=["model"])
    weakest = GaugeMetricFamily("brigade_model_weakest_layer_throughput",
                                "Smallest summed throughput of one layer (tokens/s per layer): the bottleneck.",
                                labels=["model"])
    total = GaugeMetricFamily("brigade_model_total_throughput",
                              "Summed announced throughput of online peers (tokens/s per layer).", labels=["model"])
    rtt = GaugeMetricFamily("brigade_probe_rtt_seconds", "Quantiles of the round trips of the last crawl's probes.",
                            labels=["model", "quantile"])
    versions = GaugeMetricFamily("brigade_peer_versions", "Peers with a record, by software and protocol version.",
                                 labels=["model", "software_version", "protocol_version"])
    reachable = GaugeMetricFamily("brigade_peer_reachable", "1 when the peer answered the last probe.",
                                  labels=["model", "peer_id"])
    for model in models:
        counts = dict.fromkeys(_STATUSES, 0)
        pairs: dict[tuple[str, str], int] = {}
        for peer in model.peers:
            counts[peer.status] += 1
            if peer.status != "gone":
                pair = (peer.software_version or "unknown", peer.protocol_version)
                pairs[pair] = pairs.get(pair, 0) + 1
                if peer.reachable is not None:
                    reachable.add_metric([model.name, peer.peer_id], float(peer.reachable))
        for status, count in counts.items():
            peers.add_metric([model.name, status], count)
        layers.add_metric([model.name], model.num_layers)
        covered.add_metric([model.name], model.layers_covered)
        healthy.add_metric([model.name], float(model.verdict == "healthy"))
        min_peers.add_metric([model.name], model.min_peers_per_layer)
        weakest.add_metric([model.name], model.weakest_layer_throughput)
        total.add_metric([model.name], model.total_throughput)
        for name, value in model.probe_rtt_ms.items():
            rtt.add_metric([model.name, _QUANTILE_LABELS[name]], value / 1000)
        for (software, protocol), count in sorted(pairs.items()):
            versions.add_metric([model.name, software, protocol], count)

    crawl_ok = GaugeMetricFamily("brigade_dashboard_last_crawl_success", "1 when the last crawl succeeded.")
    crawl_ok.add_metric([], float(bool(crawl.ok)))
    crawl_time = GaugeMetricFamily("brigade_dashboard_last_success_timestamp_seconds",
                                   "When the last successful crawl ended (0 = never).")
    crawl_time.add_metric([], crawl.last_success_at or 0.0)
    duration = GaugeMetricFamily("brigade_dashboard_crawl_duration_seconds", "How long the last crawl took.")
    duration.add_metric([], crawl.duration_s or 0.0)
    crawls = CounterMetricFamily("brigade_dashboard_crawls", "Crawls finished, failed ones included.")
    crawls.add_metric([], crawl.crawls)
    failures = CounterMetricFamily("brigade_dashboard_crawl_failures", "Crawls that failed.")
    failures.add_metric([], crawl.failures)
    dropped = GaugeMetricFamily("brigade_dashboard_records_dropped",
                                "DHT values that failed validation in the last crawl.")
    dropped.add_metric([], crawl.records_dropped)
    models_gauge = GaugeMetricFamily("brigade_dashboard_models", "Models shown.")
    models_gauge.add_metric([], len(models))
    return [peers, layers, covered, healthy, min_peers, weakest, total, rtt, versions, reachable,
            crawl_ok, crawl_time, duration, crawls, failures, dropped, models_gauge]


class _Fixed(Collector):
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_metrics(models: Sequence[ModelView], crawl: CrawlView) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(_families(models, crawl)))
    return generate_latest(registry)
