"""The peer process: built in one step (``PeerServer.create``), served until a signal, drained on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import replace
from typing import Any

from brigade import __version__
from brigade.kernels.checkpoint import CheckpointError, CheckpointMismatchError
from brigade.kernels.memory import PlanError
from brigade.kernels.span import Span, UnsupportedModelError
from brigade.peer import startup
from brigade.peer.config import PeerConfig
from brigade.peer.mover import SpanMover, Unloaded
from brigade.peer.pings import NextHopPings
from brigade.peer.ready import ready_line, remove_ready_file, write_ready_file
from brigade.peer.rebalancer import Rebalancer
from brigade.peer.throughput import Throughput
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, model_name_for
from brigade.protocol.targets import dialable
from brigade.protocol.tls import TlsIdentity
from brigade.routing.announce import Announcer
from brigade.routing.dht import DhtStartError
from brigade.routing.swarm import fetch_records

logger = logging.getLogger(__name__)


class PeerStartError(RuntimeError):
    """The peer cannot serve this checkpoint or plan: one line saying why and what to do."""


# What start-up can meet in a volunteer's setup (a checkpoint, a config, a budget), as opposed to bugs.
# OSError: files, disks and downloads (the Hub client's errors are OSErrors too).
STARTUP_ERRORS = (UnsupportedModelError, CheckpointError, CheckpointMismatchError, DhtStartError, PlanError, OSError)


class PeerServer:
    """One hosted span, serving. Build it with ``await PeerServer.create(config)`` (as hivemind's
    ``DHTNode.create``): every part exists once it returns. ``serve_until_stopped`` runs it until
    SIGTERM/SIGINT; ``drain`` leaves politely; ``close`` stops everything."""

    def __init__(self, config: PeerConfig, *, identity: Identity, model_name: str, dht: Any, model_config: Any,
                 throughput: Throughput, started_at: float, tls: TlsIdentity | None, services: startup.Services,
                 auto_span: bool, stack: contextlib.AsyncExitStack, _initialized_with_create: bool = False):
        """No I/O: takes the parts ``create`` started (and ``stack``, which stops them)."""
        if not _initialized_with_create:
            raise TypeError("build a peer with `await PeerServer.create(config)`")
        self.config = config
        self.identity = identity
        self.model_name = model_name
        self.auto_span = auto_span  # the span was chosen from the swarm (--layers auto), so it may move
        self.throughput = throughput.decode
        self.prefill_throughput = throughput.prefill
        self.started_at = started_at
        self.tls = tls
        self.address = services.address
        self.sessions = services.sessions
        self.executor = services.executor
        self.servicer = services.servicer
        self.connectivity = services.connectivity
        self._dht = dht
        self._model_config = model_config
        self._stack = stack
        self.announcer = Announcer(dht, identity, self._make_record, period_s=config.announce_period_s,
                                   ttl_s=config.record_ttl_s)
        self._pings: NextHopPings | None = None  # measured only when ping_period_s > 0
        self._tasks: list[asyncio.Task[None]] = []  # announcing, pings, rebalancing: cancelled on drain/close

    @classmethod
    async def create(cls, config: PeerConfig) -> PeerServer:
        """Builds a serving, announced peer in named stages (see ``peer/startup.py``).

        A volunteer's setup problem (checkpoint, budget, DHT, files) raises ``PeerStartError`` in one
        line; whatever a failed stage leaves started is stopped first.
        """
        stack = contextlib.AsyncExitStack()  # what has started so far, stopped in reverse order
        try:
            return await cls._build(config, stack)
        except BaseException as error:
            await stack.aclose()
            if isinstance(error, STARTUP_ERRORS):
                logger.debug("start-up failed", exc_info=True)  # the traceback, for whoever runs with debug logs
                raise PeerStartError(" ".join(str(error).split())) from error
            raise

    @classmethod
    async def _build(cls, config: PeerConfig, stack: contextlib.AsyncExitStack) -> PeerServer:
        auto_span = config.start_layer is None
        model_name = config.model_name or model_name_for(config.model)
        with startup.stage("identity"):
            config, identity = startup.load_identity(config)
        with startup.stage("dht"):
            dht = await startup.start_dht_node(config)
            stack.callback(dht.shutdown)
        with startup.stage("planning"):
            plan = await startup.plan(config, dht, model_name)
            config = plan.config
        assert config.start_layer is not None and config.end_layer is not None
        with startup.stage("loading"):
            span = await startup.load(config, plan.model_config, config.start_layer, config.end_layer)
        with startup.stage("throughput"):
            throughput = await startup.measure(config, span, plan.throughput_cache)
        with startup.stage("tls"):
            tls = startup.make_tls(config, identity)
        from hivemind.utils import get_dht_time

        started_at = get_dht_time()
        info = {"throughput": throughput.decode, "software_version": __version__, "started_at": started_at}
        with startup.stage("services"):
            services = await startup.serve(config, identity, model_name, span, dht, tls, lambda: info, stack)
        self = cls(config, identity=identity, model_name=model_name, dht=dht, model_config=plan.model_config,
                   throughput=throughput, started_at=started_at, tls=tls, services=services, auto_span=auto_span,
                   stack=stack, _initialized_with_create=True)
        with startup.stage("announcing"):
            await self._go_online(services.port, plan.model_config.num_hidden_layers)
        return self

    async def _go_online(self, port: int, num_layers: int) -> None:
        """Checks reachability (finding a relay when needed), announces, and starts the background loops."""
        await self.connectivity.start(direct_address=self.address, tls_cert=self.tls.cert_pem.decode() if self.tls
                                      else "", bound_port=port, announce_now=self._announce_current)
        print(self.connectivity.describe(), flush=True)
        if not await self.announcer.announce_once():
            logger.warning("first announcement failed; retrying in the background")
        self._own(asyncio.create_task(self.announcer.run(), name="announce"))
        self._start_balance_loops(num_layers)

    def _own(self, task: asyncio.Task[None]) -> None:
        task.add_done_callback(_log_task_failure)
        self._tasks.append(task)

    async def _announce_current(self) -> None:
        """Re-announces now with the current state (the relay changed, or the reachability verdict)."""
        await self.announcer.announce_once(self.announcer.state)

    # -- balance: pings to the next layers' peers, periodic re-checks, moving (docs/routing.md) ------
    def _start_balance_loops(self, num_layers: int) -> None:
        config = self.config

        async def read_records() -> list[PeerRecord]:
            return await fetch_records(self._dht, self.model_name, peer_filter=config.peer_filter)

        def span() -> tuple[int, int]:
            assert self.config.start_layer is not None and self.config.end_layer is not None
            return self.config.start_layer, self.config.end_layer

        if config.ping_period_s > 0:
            async def ping_records() -> list[PeerRecord]:  # pinged on their word: public addresses only
                return dialable(await read_records(), allow_private=config.allows_private_targets)

            self._pings = NextHopPings(self.identity.peer_id, lambda: span()[1], ping_records,
                                       period_s=config.ping_period_s)
            self._own(asyncio.create_task(self._pings.run(), name="pings"))
        if self.auto_span and config.rebalance_period_s > 0:
            mover = SpanMover(self.sessions, self.announcer.announce_state, span, self._load_span,
                              self._unload_span, self._install_span, drain_s=config.move_drain_s)
            rebalancer = Rebalancer(self.identity.peer_id, num_layers, span, read_records, mover.move,
                                    period_s=config.rebalance_period_s, min_gain=config.rebalance_min_gain)
            self._own(asyncio.create_task(rebalancer.run(), name="rebalance"))

    async def _load_span(self, start: int, end: int) -> Span:
        return await startup.load(self.config, self._model_config, start, end)

    async def _unload_span(self) -> None:
        """Drops the span (after steps queued on the compute thread); compute is refused until install."""
        executor = self.executor

        def drop() -> None:
            executor.span = Unloaded()  # type: ignore[assignment]

        await executor.run_exclusive(drop)
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    async def _install_span(self, span: Any, start: int, end: int) -> None:
        """Puts a loaded span in service: the compute thread, the servicer and sessions see it at once."""
        executor = self.executor
        new_config = replace(self.config, start_layer=start, end_layer=end)

        def swap() -> None:
            executor.span = span

        await executor.run_exclusive(swap)
        self.config = self.servicer.config = self.sessions.config = new_config

    def _make_record(self, state: str) -> PeerRecord:
        from hivemind.utils import get_dht_time

        return PeerRecord(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key.hex(),
            model_name=self.model_name,
            start_layer=self.config.start_layer,
            end_layer=self.config.end_layer,
            num_layers=self.sessions.args.num_layers,
            dtype=self.config.dtype,
            quantization=self.config.quantization,
            batch_invariant=self.config.batch_invariant,
            vouches_pushes=True,
            push_tickets=True,
            throughput=self.throughput,
            prefill_throughput=self.prefill_throughput,
            pings=self._pings.current() if self._pings is not None else {},
            free_cache_tokens=self.sessions.kv.free_tokens,
            state=state,  # type: ignore[arg-type]
            signed_at=get_dht_time(),
            started_at=self.started_at,
            software_version=__version__,
            tls_cert=self.tls.cert_pem.decode() if self.tls else "",
            tls_spki_sha256=self.tls.spki_sha256 if self.tls else "",
            **self.connectivity.record_fields(),
        )

    # -- running -----------------------------------------------------------------------------------
    def ready_info(self) -> dict[str, Any]:
        """What launchers learn once the peer is ready (its ready file): how to reach and trust it."""
        return {
            "peer_id": self.identity.peer_id,
            "address": self.address,
            "model_name": self.model_name,
            "layers": f"{self.config.start_layer}:{self.config.end_layer}",
            "quantization": self.config.quantization,
            "cache_tokens": self.config.cache_tokens,
            "throughput": round(self.throughput, 2),
            "tls_cert": self.tls.cert_pem.decode() if self.tls else "",
            "prefill_throughput": round(self.prefill_throughput, 2),
            **self.connectivity.ready_fields(),
        }

    async def serve_until_stopped(self) -> None:
        """Says it is ready (the ready file, a line for people), then serves until SIGTERM/SIGINT and drains."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        info = self.ready_info()
        if self.config.ready_file:
            write_ready_file(self.config.ready_file, info)
        print(ready_line(info), flush=True)
        await stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Leaves politely: tell the DHT, refuse new sessions, let open ones finish for a while."""
        for task in self._tasks:
            task.cancel()
        self.sessions.accepting = False
        await self.announcer.announce_leaving()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_grace_s
        while self.sessions.sessions and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await self.close()

    async def close(self) -> None:
        """Stops the loops, then every started part in reverse order of starting (once)."""
        for task in self._tasks:
            task.cancel()
        if self.config.ready_file:
            remove_ready_file(self.config.ready_file)
        await self._stack.aclose()


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def run_peer(config: PeerConfig) -> None:
    server = await PeerServer.create(config)
    await server.serve_until_stopped()


def main(config: PeerConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run_peer(config))
    except PeerStartError as error:
        print(f"brigade peer: cannot serve {config.model}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
