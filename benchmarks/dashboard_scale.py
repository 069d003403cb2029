"""How the dashboard holds up with a large simulated swarm: crawl time, and API latency during crawls.

Builds a snapshot of N signed peer records (real identities, addresses on 127.0.0.1 where nothing
listens, so every crawl also makes N refused probes), starts `brigade dashboard --snapshot` as its
own process, and measures /healthz and /api/v1/state round trips while the dashboard is idle
between crawls and while crawls run back to back.

    python benchmarks/dashboard_scale.py [--peers 2000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from brigade_dashboard import DashboardProcess, simulated_swarm, start_dashboard


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample(dashboard: DashboardProcess, seconds: float) -> tuple[list[float], list[float], int]:
    health, state, crawling = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        dashboard.get("/healthz")
        health.append((time.perf_counter() - began) * 1000)
        if len(health) % 5 == 0:
            began = time.perf_counter()
            document = dashboard.state()
            state.append((time.perf_counter() - began) * 1000)
            crawling += document.crawl.in_progress
        time.sleep(0.02)
    return health, state, crawling


def row(label: str, values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"{label:<34} {statistics.median(values):8.1f} {p99:8.1f} {max(values):8.1f} {len(values):6d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    models = {"sim/llama-3-70b": (80, args.peers * 3 // 4), "sim/mixtral-8x7b": (32, args.peers // 5)}
    models["sim/qwen2-7b"] = (28, args.peers - sum(peers for _, peers in models.values()))

    with tempfile.TemporaryDirectory(prefix="brigade-dashboard-bench-") as folder:
        snapshot = Path(folder) / "snapshot.json"
        began = time.perf_counter()
        snapshot.write_text(json.dumps(simulated_swarm(models, address=f"127.0.0.1:{closed_port()}")))
        print(f"signed {args.peers} records in {time.perf_counter() - began:.2f} s "
              f"({snapshot.stat().st_size // 1024} KB snapshot)")
        results = {}
        for mode, period in (("idle (crawl every 60 s)", "60"), ("crawling back to back", "0.2")):
            dashboard = start_dashboard(["--snapshot", str(snapshot), "--crawl-period", period, "--probe-timeout", "1"],
                                        Path(folder) / f"dashboard-{period}.log")
            try:
                dashboard.wait_for(lambda state: state.crawl.ok is not None, 120, "done with its first crawl")
                health, state, crawling = sample(dashboard, args.seconds)
                final = dashboard.state()
                results[mode] = (health, state, crawling, final)
            finally:
                dashboard.stop()
        print(f"\n{'ms':<34} {'p50':>8} {'p99':>8} {'max':>8} {'n':>6}")
        for mode, (health, state, _, _) in results.items():
            print(row(f"/healthz, {mode}", health))
            print(row(f"/api/v1/state, {mode}", state))
        final = results["crawling back to back"][3]
        size = len(json.dumps(final.model_dump(mode="json"))) // 1024
        print(f"\none crawl of {final.crawl.records_seen} records with {final.crawl.peers_probed} probes: "
              f"{final.crawl.duration_s:.2f} s; state document {size} KB; "
              f"{results['crawling back to back'][2]} state reads answered mid-crawl")


if __name__ == "__main__":
    main()
