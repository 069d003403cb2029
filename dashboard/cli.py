"""`brigade dashboard` (the web service) and `brigade swarm status` (one crawl, printed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from brigade.dashboard.crawler import CrawlerConfig
    from brigade.routing.crawl import SwarmSource

READY_MARK = "BRIGADE_DASHBOARD_READY"

swarm_app = typer.Typer(help="Look at a swarm from the terminal.", no_args_is_help=True)

InitialPeers = Annotated[list[str] | None, typer.Option("--initial-peers", help="DHT multiaddr(s) to join.")]
Snapshot = Annotated[Path | None, typer.Option(help="Read a saved snapshot (JSON) instead of the DHT.")]
ProbeTimeout = Annotated[float, typer.Option(help="Seconds one peer's Info probe may take.")]
ProbeConcurrency = Annotated[int, typer.Option(help="Probes in flight at once (0: do not probe).")]
PrivateSwarm = Annotated[bool | None, typer.Option(
    "--private-swarm/--public-swarm",
    help="Probe private, loopback and link-local addresses that records name (a LAN or test swarm). "
         "Default: private only when every --initial-peers address is one.")]


def _private(initial_peers: list[str] | None, private_swarm: bool | None) -> bool:
    """Whether to probe non-public addresses: as told, else when the swarm is joined only through such."""
    from brigade.protocol.targets import joins_privately

    return private_swarm if private_swarm is not None else joins_privately(initial_peers or (), ())


def _source(initial_peers: list[str] | None, snapshot: Path | None) -> SwarmSource:
    from brigade.routing.crawl import DHTSource, SnapshotSource

    if snapshot is not None:
        if initial_peers:
            raise typer.BadParameter("give --initial-peers or --snapshot, not both")
        return SnapshotSource(snapshot)
    if not initial_peers:
        raise typer.BadParameter("--initial-peers is required (the multiaddr printed by `brigade dht`)")
    return DHTSource(initial_peers)


def dashboard(
    initial_peers: InitialPeers = None,
    host: Annotated[str, typer.Option(help="Interface to serve on (0.0.0.0 to publish it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0 = any free port).")] = 8080,
    crawl_period: Annotated[float, typer.Option(help="Seconds between crawls of the swarm.")] = 30.0,
    probe_timeout: ProbeTimeout = 2.0,
    probe_concurrency: ProbeConcurrency = 32,
    history_hours: Annotated[float, typer.Option(help="Hours of history kept for the charts.")] = 6.0,
    forget_after: Annotated[float, typer.Option(help="Seconds a peer gone from the DHT stays listed.")] = 900.0,
    snapshot: Snapshot = None,
    private_swarm: PrivateSwarm = None,
) -> None:
    """Serve the swarm health page, its JSON API and Prometheus metrics (read-only)."""
    import asyncio
    import logging

    from brigade.dashboard.crawler import CrawlerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 0 <= port < 65536:
        raise typer.BadParameter(f"--port must be 0..65535, got {port}")
    try:
        config = CrawlerConfig(period_s=crawl_period, probe_timeout_s=probe_timeout,
                               probe_concurrency=probe_concurrency, history_s=history_hours * 3600,
                               forget_after_s=forget_after,
                               allow_private=_private(initial_peers, private_swarm))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    asyncio.run(_serve(_source(initial_peers, snapshot), config, host, port))


async def _serve(source: SwarmSource, config: CrawlerConfig, host: str, port: int) -> None:
    import asyncio
    import socket

    import uvicorn

    from brigade.dashboard.app import create_app
    from brigade.dashboard.crawler import Crawler

    # Bind first, so --port 0 works and the ready line can name the real port.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {e}") from e
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Crawler(source, config)), loop="asyncio", lifespan="on",
                                           access_log=False, log_level="info", timeout_graceful_shutdown=5))
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        for _ in range(600):  # uvicorn starts within a fraction of a second; never wait unbounded
            if server.started or serving.done():
                break
            await asyncio.sleep(0.05)
        if server.started:
            url_host = f"[{host}]" if family == socket.AF_INET6 else host
            print(f"dashboard on http://{url_host}:{bound_port}/  (crawling {source.description})", flush=True)
            print(f"{READY_MARK} {json.dumps({'url': f'http://{url_host}:{bound_port}'})}", flush=True)
        await serving
    finally:
        sock.close()


@swarm_app.command()
def status(
    initial_peers: InitialPeers = None,
    model: Annotated[str | None, typer.Option(help="Show only this model.")] = None,
    peers: Annotated[bool, typer.Option(help="List each model's peers.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the /api/v1/state document instead.")] = False,
    probe_timeout: ProbeTimeout = 2.0,
    probe_concurrency: ProbeConcurrency = 32,
    save_snapshot: Annotated[Path | None, typer.Option(help="Also save the raw values read, for --snapshot.")] = None,
    snapshot: Snapshot = None,
    private_swarm: PrivateSwarm = None,
) -> None:
    """Crawl the swarm once and print each model's verdict, coverage and peers."""
    import asyncio
    import logging

    from rich.console import Console

    from brigade.dashboard.crawler import Crawler, CrawlerConfig
    from brigade.dashboard.terminal import print_status
    from brigade.routing.crawl import crawl
    from brigade.routing.crawl import save_snapshot as write_snapshot

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    source = _source(initial_peers, snapshot)
    crawler = Crawler(source, CrawlerConfig(probe_timeout_s=probe_timeout, probe_concurrency=probe_concurrency,
                                            allow_private=_private(initial_peers, private_swarm)))

    async def once() -> None:
        try:
            await source.start()
            await crawler.crawl_once()
            if save_snapshot is not None:
                write_snapshot(await crawl(source, keep_raw=True), save_snapshot)
        finally:
            await asyncio.to_thread(source.close)

    try:
        asyncio.run(once())
    except RuntimeError as e:  # the DHT could not be joined: say so plainly
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    models = [m for m in crawler.models if model is None or m.name == model]
    view = crawler.crawl_view()
    if json_output:
        typer.echo(crawler.state_json().decode() if model is None else json.dumps(
            {**json.loads(crawler.state_json()), "models": [m.model_dump(mode="json") for m in models]}))
    else:
        print_status(Console(), models, view, peers=peers)
    if not view.ok:
        raise typer.Exit(1)
