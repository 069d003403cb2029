"""The crawler over recorded snapshots: the same parsing as the DHT, no processes needed.

Covers what a live swarm cannot be made to do on demand: forged and junk values, a source that
fails, peers that leave the DHT (shown as gone, then forgotten), bounded history, and metrics
that Prometheus' own parser accepts.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from brigade_dashboard import add_peer, peer_record, simulated_swarm
from prometheus_client.parser import text_string_to_metric_families

from brigade.dashboard.crawler import Crawler, CrawlerConfig
from brigade.dashboard.schema import DashboardState
from brigade.protocol.identity import Identity
from brigade.protocol.records import MODELS_INDEX_KEY, IndexEntry, model_key, sign
from brigade.routing.crawl import CrawlError, SnapshotSource, crawl

NO_PROBES = CrawlerConfig(period_s=1, probe_concurrency=0)


def write(path: Path, snapshot: dict) -> Path:
    path.write_text(json.dumps(snapshot))
    return path


def test_crawl_skips_forged_junk_and_misplaced_values(tmp_path: Path) -> None:
    snapshot = simulated_swarm({"a": (8, 5), "b": (4, 2)})
    honest, attacker = Identity.generate(), Identity.generate()
    good = peer_record(honest, "a", 0, 8, 8)
    add_peer(snapshot, honest, good)
    # the attacker's valid record under the honest peer's subkey; a tampered span; junk of all shapes
    snapshot[model_key("a")]["bpVictim"] = sign(peer_record(attacker, "a", 0, 8, 8), attacker)
    tampered = sign(peer_record(attacker, "a", 0, 4, 8), attacker)
    tampered["fields"]["end_layer"] = 8
    snapshot[model_key("a")][attacker.peer_id] = tampered
    snapshot[model_key("a")]["junk"] = {"fields": "x", "signature": 3}
    snapshot[model_key("a")]["deep"] = {"fields": {"a": [[[[1]]]]}, "signature": "00"}
    # a record of model b stored under model a's key, and index entries that lie or are junk
    other = Identity.generate()
    snapshot[model_key("a")][other.peer_id] = sign(peer_record(other, "b", 0, 4, 4), other)
    now = time.time()
    bad_name = IndexEntry(peer_id=other.peer_id, public_key=other.public_key.hex(), model_name="../etc",
                          signed_at=now, expires_at=now + 60)
    snapshot[MODELS_INDEX_KEY][other.peer_id] = sign(bad_name, other)
    snapshot[MODELS_INDEX_KEY]["bpNotTheSigner"] = snapshot[MODELS_INDEX_KEY][honest.peer_id]
    snapshot[MODELS_INDEX_KEY]["junk"] = [1, 2, 3]

    result = asyncio.run(crawl(SnapshotSource(write(tmp_path / "s.json", snapshot))))
    assert sorted(result.models) == ["a", "b"]
    assert len(result.models["a"].records) == 6 and result.models["a"].dropped == 5
    assert len(result.models["b"].records) == 2 and result.models["b"].dropped == 0
    assert result.index_dropped == 3 and result.records_dropped == 8
    assert good in result.models["a"].records


def test_unreadable_snapshot_is_a_crawl_error(tmp_path: Path) -> None:
    with pytest.raises(CrawlError, match="cannot read the snapshot"):
        asyncio.run(crawl(SnapshotSource(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(CrawlError):
        asyncio.run(crawl(SnapshotSource(tmp_path / "bad.json")))


def test_failed_crawl_keeps_the_last_state_and_says_so(tmp_path: Path) -> None:
    path = write(tmp_path / "s.json", simulated_swarm({"a": (8, 3)}))

    async def scenario() -> None:
        crawler = Crawler(SnapshotSource(path), NO_PROBES)
        assert await crawler.crawl_once()
        path.write_text("not json")
        assert not await crawler.crawl_once()
        state = DashboardState.model_validate_json(crawler.state_json())
        assert state.crawl.ok is False and "cannot read the snapshot" in state.crawl.error
        assert state.crawl.failures == 1 and state.crawl.crawls == 2 and state.crawl.last_success_at
        assert [model.name for model in state.models] == ["a"]  # the last good picture stays
        metrics = {sample.name: sample.value for family in text_string_to_metric_families(
            crawler.metrics_text().decode()) for sample in family.samples}
        assert metrics["brigade_dashboard_last_crawl_success"] == 0
        assert metrics["brigade_dashboard_crawl_failures_total"] == 1

    asyncio.run(scenario())


def test_gone_peers_are_listed_then_forgotten_and_history_is_bounded(tmp_path: Path) -> None:
    leaving, staying = Identity.generate(), Identity.generate()
    snapshot: dict = {}
    add_peer(snapshot, staying, peer_record(staying, "a", 0, 4, 4))
    add_peer(snapshot, leaving, peer_record(leaving, "a", 0, 2, 4))
    path = write(tmp_path / "s.json", snapshot)
    config = CrawlerConfig(period_s=1, probe_concurrency=0, forget_after_s=0.3, history_s=10, history_points=4)

    async def scenario() -> None:
        crawler = Crawler(SnapshotSource(path), config)
        assert await crawler.crawl_once()
        del snapshot[model_key("a")][leaving.peer_id]
        write(path, snapshot)
        time.sleep(0.01)  # a new mtime
        assert await crawler.crawl_once()
        [model] = crawler.models
        assert {peer.peer_id: peer.status for peer in model.peers} == {staying.peer_id: "online",
                                                                      leaving.peer_id: "gone"}
        assert model.peers_total == 1 and model.peers_online == 1
        await asyncio.sleep(0.35)
        assert await crawler.crawl_once()
        [model] = crawler.models
        assert [peer.peer_id for peer in model.peers] == [staying.peer_id]
        for _ in range(20):
            assert await crawler.crawl_once()
        assert 2 <= len(crawler.models[0].history) <= 4

    asyncio.run(scenario())


def test_state_and_metrics_of_a_simulated_swarm(tmp_path: Path) -> None:
    snapshot = simulated_swarm({"big": (32, 120), "holey": (12, 20)}, leave_gap=("holey", 5, 7))
    path = write(tmp_path / "s.json", snapshot)

    async def scenario() -> Crawler:
        crawler = Crawler(SnapshotSource(path), NO_PROBES)
        assert await crawler.crawl_once()
        return crawler

    crawler = asyncio.run(scenario())
    state = DashboardState.model_validate_json(crawler.state_json())
    models = {model.name: model for model in state.models}
    assert models["big"].verdict == "healthy" and len(models["big"].layers) == 32
    assert models["holey"].verdict == "broken" and models["holey"].gaps == [(5, 7)]
    assert state.crawl.records_seen == 140 and state.crawl.ok

    families = {family.name: family for family in text_string_to_metric_families(crawler.metrics_text().decode())}
    covered = {sample.labels["model"]: sample.value for sample in families["brigade_model_layers_covered"].samples}
    assert covered == {"big": 32, "holey": 10}
    healthy = {sample.labels["model"]: sample.value for sample in families["brigade_model_healthy"].samples}
    assert healthy == {"big": 1, "holey": 0}
    online = {(s.labels["model"], s.labels["status"]): s.value for s in families["brigade_model_peers"].samples}
    assert online["big", "online"] == 120 and online["holey", "unreachable"] == 0
    versions = sum(s.value for s in families["brigade_peer_versions"].samples if s.labels["model"] == "big")
    assert versions == 120
    assert "brigade_model_weakest_layer_throughput" in families


def test_a_flooded_key_is_read_only_up_to_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import brigade.routing.crawl as crawl_module

    monkeypatch.setattr(crawl_module, "MAX_ENTRIES_PER_KEY", 10)
    snapshot = simulated_swarm({"a": (8, 25)})
    result = asyncio.run(crawl(SnapshotSource(write(tmp_path / "s.json", snapshot))))
    assert result.index_dropped == 15 and result.index_entries == 10
    assert len(result.models["a"].records) == 10 and result.models["a"].dropped == 15
