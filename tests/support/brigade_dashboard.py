"""Dashboard test helpers: simulated swarms, and a dashboard process to read from.

``simulated_swarm`` returns what a ``SnapshotSource`` file holds (``{key: {subkey: signed
value}}``) with real identities and signatures, so thousands of simulated peers go through the
same parsing as records read from the DHT, without a process each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from brigade.dashboard.schema import DashboardState
from brigade.protocol.identity import Identity
from brigade.protocol.records import MODELS_INDEX_KEY, IndexEntry, PeerRecord, model_key, sign


def peer_record(identity: Identity, model: str, start: int, end: int, num_layers: int, **fields: Any) -> PeerRecord:
    now = time.time()
    values: dict[str, Any] = dict(
        peer_id=identity.peer_id, public_key=identity.public_key.hex(), address="127.0.0.1:9",
        model_name=model, start_layer=start, end_layer=end, num_layers=num_layers, dtype="float32",
        throughput=10.0, free_cache_tokens=4096, signed_at=now, expires_at=now + 55, started_at=now - 600,
        software_version="0.1.0",
    )
    values.update(fields)
    return PeerRecord(**values)


def add_peer(snapshot: dict[str, dict[str, Any]], identity: Identity, record: PeerRecord) -> None:
    """Stores ``record`` and its index entry the way ``Announcer`` does."""
    entry = IndexEntry(peer_id=record.peer_id, public_key=record.public_key, model_name=record.model_name,
                       signed_at=record.signed_at, expires_at=record.expires_at)
    snapshot.setdefault(model_key(record.model_name), {})[record.peer_id] = sign(record, identity)
    snapshot.setdefault(MODELS_INDEX_KEY, {})[record.peer_id] = sign(entry, identity)


def simulated_swarm(models: dict[str, tuple[int, int]], *, seed: int = 0, address: str = "127.0.0.1:9",
                    leave_gap: tuple[str, int, int] | None = None) -> dict[str, dict[str, Any]]:
    """``models``: name -> (num_layers, peers). The first peers tile the layers in spans of 4 (so
    every layer is served when there are enough peers), the rest take random spans of 1 to 16;
    ``leave_gap`` = (model, start, end) keeps every span of that model off those layers."""
    rng = random.Random(seed)
    snapshot: dict[str, dict[str, Any]] = {}
    for name, (num_layers, peers) in models.items():
        allowed = [(0, num_layers)]
        if leave_gap and leave_gap[0] == name:
            allowed = [(a, b) for a, b in ((0, leave_gap[1]), (leave_gap[2], num_layers)) if a < b]
        spans = [(start, min(end, start + 4)) for start_, end in allowed for start in range(start_, end, 4)]
        while len(spans) < peers:
            low, high = rng.choice(allowed)
            start = rng.randrange(low, high)
            spans.append((start, min(high, start + rng.randint(1, 16))))
        for start, end in spans[:peers]:
            identity = Identity.generate()
            record = peer_record(identity, name, start, end, num_layers, address=address,
                                 throughput=round(rng.uniform(5, 200), 2),
                                 quantization=rng.choice(["none", "int8", "nf4"]),
                                 software_version=rng.choice(["0.1.0", "0.1.0", "0.1.1"]))
            add_peer(snapshot, identity, record)
    return snapshot


READY_MARK = "BRIGADE_DASHBOARD_READY"


@dataclass
class DashboardProcess:
    """A `brigade dashboard` process on 127.0.0.1 and the means to read it."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def get(self, path: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def state(self) -> DashboardState:
        status, body = self.get("/api/v1/state")
        assert status == 200, body[:500]
        return DashboardState.model_validate_json(body)

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Metric name -> {sorted label pairs: value}, parsed by Prometheus' own parser."""
        status, body = self.get("/metrics")
        assert status == 200
        parsed: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return parsed

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for(self, check: Callable[[DashboardState], bool], timeout_s: float, what: str) -> DashboardState:
        """Polls the state until ``check`` holds; fails with the last state's summary otherwise."""
        deadline = time.monotonic() + timeout_s
        state = self.state()
        while not check(state):
            if time.monotonic() > deadline:
                summary = [(m.name, m.verdict, [(p.short_id, p.status) for p in m.peers]) for m in state.models]
                raise AssertionError(f"not {what} within {timeout_s:.0f} s: crawl={state.crawl}, models={summary}\n"
                                     f"{self.log_tail()}")
            time.sleep(0.2)
            state = self.state()
        return state

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to whatever is left in its group (its DHT child)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


def start_dashboard(args: list[str], log_path: Path, timeout_s: float = 90.0) -> DashboardProcess:
    """Starts `python -m brigade dashboard ARGS --port 0` and waits for its ready line."""
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "brigade", "dashboard", "--host", "127.0.0.1", "--port", "0",
                                *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    log.close()
    dashboard = DashboardProcess(process, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith(READY_MARK + " "):
                    dashboard.url = json.loads(line[len(READY_MARK) + 1:])["url"]
                    return dashboard
            if process.poll() is not None:
                raise RuntimeError(f"the dashboard exited early:\n{dashboard.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"the dashboard was not ready within {timeout_s:.0f} s:\n{dashboard.log_tail()}")
    except BaseException:
        dashboard.stop()
        raise
