"""The swarm's state as rich tables, for `brigade swarm status`: the page's summary in a terminal."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from brigade.dashboard.health import format_ranges
from brigade.dashboard.schema import CrawlView, ModelView

_STATUS_STYLE = {"online": "green", "leaving": "yellow", "unreachable": "red", "gone": "dim"}


def _age(t: float | None, now: float) -> str:
    if not t:
        return "-"
    seconds = max(0.0, now - t)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def coverage_bar(model: ModelView) -> Text:
    """One character per layer (at most 80, then groups of layers): the page's coverage strip."""
    layers = model.layers
    width = min(80, len(layers)) or 1
    bar = Text()
    for index in range(width):
        group = layers[index * len(layers) // width: max(index * len(layers) // width + 1,
                                                       (index + 1) * len(layers) // width)]
        fewest = min((layer.peers for layer in group), default=0)
        if fewest == 0:
            bar.append("█", style="red")
        else:
            bar.append("█" if fewest > 1 else "▓", style="green" if fewest > 1 else "yellow")
    return bar


def models_table(models: Sequence[ModelView]) -> Table:
    table = Table(title="models", title_justify="left")
    for column, justify in (("model", "left"), ("verdict", "left"), ("layers", "right"), ("peers online", "right"),
                            ("weakest tok/s", "right"), ("probe p50 ms", "right"), ("missing", "left"),
                            ("versions", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for model in models:
        verdict = Text(model.verdict, style="bold green" if model.verdict == "healthy" else "bold red")
        p50 = model.probe_rtt_ms.get("p50")
        table.add_row(
            model.name, verdict, f"{model.layers_covered}/{model.num_layers}",
            f"{model.peers_online}/{model.peers_total}", f"{model.weakest_layer_throughput:.1f}",
            "-" if p50 is None else f"{p50:.1f}", format_ranges(model.gaps) or "-",
            ", ".join(f"{version} x{count}" for version, count in model.versions.items()),
        )
    return table


def peers_table(model: ModelView, now: float) -> Table:
    table = Table(title=f"{model.name}: peers", title_justify="left")
    for column in ("peer", "address", "span", "dtype/quant", "tok/s", "free cache", "version", "rtt ms", "status",
                   "uptime", "last seen"):
        table.add_column(column, justify="right" if column in ("tok/s", "free cache", "rtt ms") else "left")
    for peer in model.peers:
        status = peer.status + (f" ({peer.probe_error})" if peer.probe_error else "")
        table.add_row(
            peer.short_id, peer.address, f"{peer.start_layer}:{peer.end_layer}",
            peer.dtype + ("" if peer.quantization == "none" else f"/{peer.quantization}"),
            f"{peer.throughput:.1f}", str(peer.free_cache_tokens), peer.software_version or "?",
            "-" if peer.rtt_ms is None else f"{peer.rtt_ms:.1f}", Text(status, style=_STATUS_STYLE[peer.status]),
            _age(peer.started_at, now) if peer.status != "gone" else "-", _age(peer.last_announced_at, now) + " ago",
        )
    return table


def print_status(console: Console, models: Sequence[ModelView], crawl: CrawlView, *, peers: bool = True) -> None:
    now = time.time()
    if not crawl.ok:
        console.print(Text(f"crawl failed: {crawl.error}", style="bold red"))
        return
    console.print(f"crawled {crawl.source} in {crawl.duration_s or 0:.1f} s: {len(models)} models, "
                  f"{crawl.records_seen} records ({crawl.records_dropped} invalid, skipped), "
                  f"{crawl.peers_probed} peers probed")
    if not models:
        console.print("no model has peers in the DHT right now")
        return
    console.print(models_table(models))
    for model in models:
        parts: list[Table | Text] = [Text.assemble((model.name + " ", "bold"), coverage_bar(model),
                                                   f"  layers 0:{model.num_layers}")]
        parts += [Text("  ! " + warning, style="yellow") for warning in model.warnings]
        console.print(Group(*parts))
        if peers:
            console.print(peers_table(model, now))
