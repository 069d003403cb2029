"""The dashboard against a real swarm: bootstrap + 3 peer processes + the dashboard process, on 127.0.0.1.

One swarm for the module, used in order: the JSON and metrics of the healthy swarm, the terminal
summary, the page in a headless browser, and last (it breaks the swarm) a killed peer showing up
within one crawl period plus the record expiry.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from brigade_browser import browser_page, screenshot_path
from brigade_dashboard import DashboardProcess, start_dashboard
from brigade_testkit import FAST_PEER_ARGS, start_swarm
from typer.testing import CliRunner

from brigade.cli import app
from brigade.dashboard.schema import DashboardState
from brigade.deploy.launcher import LocalSwarm

pytestmark = pytest.mark.timeout(300)
logger = logging.getLogger(__name__)

SPANS = [(0, 2), (2, 4), (4, 6)]
CRAWL_PERIOD_S = 1.0
RECORD_TTL_S = float(FAST_PEER_ARGS[FAST_PEER_ARGS.index("--record-ttl") + 1])
SLACK_S = 6.0  # a crawl's own time (DHT get, probes) and this shared 2-core machine's hiccups


@dataclass
class Live:
    swarm: LocalSwarm
    dashboard: DashboardProcess
    model: str

    def peer_ids(self) -> list[str]:
        return [str(peer.info["peer_id"]) for peer in self.swarm.peers]


@pytest.fixture(scope="module")
def live(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("dashboard-swarm")
    swarm = start_swarm(folder / "logs", llama_checkpoint, SPANS)
    try:
        args = ["--crawl-period", str(CRAWL_PERIOD_S), "--probe-timeout", "1"]
        for maddr in swarm.initial_peers:
            args += ["--initial-peers", maddr]
        dashboard = start_dashboard(args, folder / "dashboard.log")
        try:
            yield Live(swarm, dashboard, llama_checkpoint.name)
        finally:
            dashboard.stop()
    finally:
        swarm.close()


def model_of(state: DashboardState, name: str):
    return next((model for model in state.models if model.name == name), None)


def healthy_with_all(live: Live):
    def check(state: DashboardState) -> bool:
        model = model_of(state, live.model)
        return model is not None and model.verdict == "healthy" and model.peers_online == len(SPANS)

    return check


def test_state_and_metrics_show_the_swarm(live: Live) -> None:
    state = live.dashboard.wait_for(healthy_with_all(live), 90, "healthy with 3 online peers")
    model = model_of(state, live.model)
    assert state.crawl.ok and state.crawl.source.startswith("DHT via")
    assert model.num_layers == 6 and model.gaps == [] and model.layers_covered == 6
    assert [layer.peers for layer in model.layers] == [1] * 6
    assert all(layer.throughput > 0 for layer in model.layers)
    by_id = {peer.peer_id: peer for peer in model.peers}
    assert sorted(by_id) == sorted(live.peer_ids())
    for launched, span in zip(live.swarm.peers, SPANS, strict=True):
        peer = by_id[str(launched.info["peer_id"])]
        assert (peer.start_layer, peer.end_layer) == span and peer.address == launched.info["address"]
        assert peer.status == "online" and peer.reachable and peer.rtt_ms is not None and peer.rtt_ms > 0
        assert peer.software_version and peer.started_at > 0 and peer.open_sessions == 0
        assert peer.free_cache_tokens > 0 and peer.dtype == "float32"
    assert set(model.probe_rtt_ms) == {"p50", "p90", "p99"}

    metrics = live.dashboard.metrics()
    label = (("model", live.model),)
    assert metrics["brigade_model_healthy"][label] == 1
    assert metrics["brigade_model_layers_covered"][label] == 6
    assert metrics["brigade_model_peers"][(("model", live.model), ("status", "online"))] == 3
    assert metrics["brigade_model_weakest_layer_throughput"][label] > 0
    assert (("model", live.model), ("quantile", "0.5")) in metrics["brigade_probe_rtt_seconds"]
    assert sum(metrics["brigade_peer_versions"].values()) == 3
    assert live.dashboard.get("/healthz")[0] == 200
    for path in ("/", "/healthz"):  # monitors that only ask HEAD
        with urllib.request.urlopen(urllib.request.Request(live.dashboard.url + path, method="HEAD"), timeout=10) as r:
            assert r.status == 200


def test_swarm_status_prints_the_summary(live: Live) -> None:
    args = ["swarm", "status", "--probe-timeout", "1"]
    for maddr in live.swarm.initial_peers:
        args += ["--initial-peers", maddr]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert live.model in result.output and "healthy" in result.output
    for peer_id in live.peer_ids():
        assert peer_id[-8:] in result.output


def test_page_shows_the_swarm(live: Live) -> None:
    live.dashboard.wait_for(healthy_with_all(live), 30, "healthy with 3 online peers")
    with browser_page() as page:
        page.goto(live.dashboard.url + "/")
        page.wait_for_selector("body[data-state=ready]")
        section = page.locator(f'section.model[data-model="{live.model}"]')
        section.wait_for()
        assert section.locator(".verdict").first.inner_text().strip().lower() == "healthy"
        assert section.locator(".strip .cell").count() == 6
        assert section.locator(".strip .cell.gap").count() == 0
        rows = section.locator("table.peers tbody tr")
        assert rows.count() == 3
        assert all(text.strip() == "online" for text in section.locator("table.peers td.status").all_inner_texts())
        assert "FAILED" not in page.locator("#crawl").inner_text()
        text = page.locator("main").inner_text()
        assert live.model in text and len(text) > 200, "the page rendered (almost) empty"
        page.screenshot(path=str(screenshot_path("dashboard-swarm.png")), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.screenshot(path=str(screenshot_path("dashboard-swarm-phone.png")), full_page=True)


def test_killed_peer_shows_within_a_crawl_period_plus_the_record_expiry(live: Live) -> None:
    live.dashboard.wait_for(healthy_with_all(live), 30, "healthy with 3 online peers")
    victim = live.swarm.peers[1]
    victim_id = str(victim.info["peer_id"])
    victim.kill()  # SIGKILL to its process group: no "leaving" announcement, its record lingers
    killed_at = time.monotonic()

    def broken(state: DashboardState) -> bool:
        model = model_of(state, live.model)
        peer = model and next((p for p in model.peers if p.peer_id == victim_id), None)
        return bool(model and model.verdict == "broken" and model.gaps == [(2, 4)] and peer
                    and peer.status in ("unreachable", "gone"))

    limit = CRAWL_PERIOD_S + RECORD_TTL_S + SLACK_S
    state = live.dashboard.wait_for(broken, limit, "broken with layers 2:4 missing")
    detected_s = time.monotonic() - killed_at
    model = model_of(state, live.model)
    assert model.peers_online == 2 and model.layers_covered == 4
    metrics = live.dashboard.metrics()
    label = (("model", live.model),)
    assert metrics["brigade_model_healthy"][label] == 0
    assert metrics["brigade_model_layers_covered"][label] == 4
    assert metrics["brigade_model_peers"][(("model", live.model), ("status", "online"))] == 2

    # Once its record expires it is listed as gone (not as a peer of the swarm any more).
    def gone(state: DashboardState) -> bool:
        model = model_of(state, live.model)
        return any(p.peer_id == victim_id and p.status == "gone" for p in model.peers) and model.peers_total == 2

    live.dashboard.wait_for(gone, limit, "listing the killed peer as gone")
    gone_s = time.monotonic() - killed_at
    metrics = live.dashboard.metrics()
    assert metrics["brigade_model_peers"][(("model", live.model), ("status", "gone"))] == 1
    assert live.dashboard.get("/healthz")[0] == 200
    logger.warning("killed peer: broken after %.1f s, gone after %.1f s (limit %.1f s)", detected_s, gone_s, limit)
