"""The peer process's lifecycle: load the span, serve it over gRPC, announce it, drain on exit."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from dataclasses import replace
from typing import Any

import grpc

from brigade import __version__
from brigade.kernels.checkpoint import CheckpointError, CheckpointMismatchError
from brigade.kernels.families import model_args
from brigade.kernels.loading import COMPUTE_DTYPES, load_config, load_span
from brigade.kernels.memory import PlanError
from brigade.kernels.quant import quantize_span
from brigade.kernels.span import UnsupportedModelError
from brigade.peer.config import PeerConfig
from brigade.peer.connectivity import Connectivity
from brigade.peer.executor import SpanExecutor
from brigade.peer.launcher import PEER_READY
from brigade.peer.mover import SpanMover, Unloaded
from brigade.peer.pings import NextHopPings
from brigade.peer.planning import resolve_span
from brigade.peer.rebalancer import Rebalancer
from brigade.peer.servicer import PeerServicer
from brigade.peer.sessions import SessionManager
from brigade.peer.throughput import cache_path_for, known_throughput, self_throughput
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, model_name_for
from brigade.protocol.tls import TlsIdentity
from brigade.routing.announce import Announcer
from brigade.routing.dht import DhtStartError, start_dht
from brigade.routing.peer_filter import PeerFilter
from brigade.routing.swarm import fetch_records

logger = logging.getLogger(__name__)



class PeerServer:
    """One hosted span. ``start`` does the I/O; ``serve_until_stopped`` runs until SIGTERM/SIGINT."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.identity: Identity | None = None
        self.model_name = config.model_name or model_name_for(config.model)
        self.throughput = 0.0
        self.prefill_throughput = 0.0
        self.auto_span = config.start_layer is None  # chosen from the swarm, so it may move
        self.address = ""
        self.started_at = 0.0
        self._server: grpc.aio.Server | None = None
        self._dht: Any = None
        self._announcer: Announcer | None = None
        self._announce_task: asyncio.Task[None] | None = None
        self._sessions: SessionManager | None = None
        self._executor: SpanExecutor | None = None
        self._servicer: PeerServicer | None = None
        self.tls: TlsIdentity | None = None
        self._model_config: Any = None
        self._pings: NextHopPings | None = None
        self._rebalancer: Rebalancer | None = None
        self._loops: list[asyncio.Task[None]] = []  # pings and rebalancing, cancelled on drain/close
        self._connectivity: Connectivity | None = None  # reachability, relaying (docs/relays.md)

    async def start(self) -> None:
        config = self.config
        self.identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
        if config.allowed_peers is not None and self.identity.peer_id not in config.allowed_peers:
            # A private swarm's member list need not name each member's own id: its node must keep its own record.
            config = self.config = replace(config, allowed_peers=config.allowed_peers | {self.identity.peer_id})
        dtype = COMPUTE_DTYPES[config.dtype]
        model_config = load_config(config.model, config.revision)
        self._model_config = model_config
        num_layers = model_config.num_hidden_layers
        if config.start_layer is not None and not 0 <= config.start_layer < (config.end_layer or 0) <= num_layers:
            raise PlanError(f"--layers {config.start_layer}:{config.end_layer} is outside the model's {num_layers} "
                            "layers")
        loop = asyncio.get_running_loop()
        self._dht = await loop.run_in_executor(
            None, lambda: start_dht(config.initial_peers, listen_maddrs=config.dht_listen,
                                    peer_filter=_node_filter(config))
        )
        records = (await fetch_records(self._dht, self.model_name, peer_filter=config.peer_filter)
                   if config.start_layer is None else [])
        cache_path = cache_path_for(config.throughput_cache)
        known = known_throughput(model_args(model_config), dtype, config.device, config.quantization,
                                 config.throughput, cache_path)
        config, plan = resolve_span(config, model_config, records, throughput=known.decode if known else None)
        self.config = config
        print(f"plan: layers {config.start_layer}:{config.end_layer} at {config.dtype}/{config.quantization}: "
              f"{plan.describe()}", flush=True)
        assert config.start_layer is not None and config.end_layer is not None
        span = await self._load_span(config.start_layer, config.end_layer)
        measured = await loop.run_in_executor(
            None, self_throughput, span, dtype, config.device, config.quantization, config.throughput, cache_path
        )
        self.throughput, self.prefill_throughput = measured.decode, measured.prefill
        self._sessions = SessionManager(config, span.args, dtype, config.device)
        self._executor = SpanExecutor(span, dtype, config.device, config.num_threads,
                                      max_batch_tokens=config.max_batch_tokens,
                                      batch_window_s=config.batch_window_ms / 1000)
        self._executor.start()
        self._servicer = PeerServicer(
            config, self.model_name, self.identity, self._sessions, self._executor,
            info_extra=lambda: {"throughput": self.throughput, "software_version": __version__,
                                "started_at": self.started_at},
        )
        self._server = grpc.aio.server(options=grpc_options(config.max_message_bytes))
        pb_grpc.add_PeerServicer_to_server(self._servicer, self._server)
        self._connectivity = Connectivity(config, self.identity, self._dht, self.model_name)
        self._connectivity.add_services(self._server)
        bind = f"{config.host}:{config.port}"
        if config.insecure:
            port = self._server.add_insecure_port(bind)
        else:
            self.tls = TlsIdentity.generate(self.identity.peer_id)
            port = self._server.add_secure_port(bind, self.tls.server_credentials())
        if port == 0:
            raise RuntimeError(f"could not bind {config.host}:{config.port}")
        await self._server.start()
        self.address = f"{config.announce_host or config.host}:{config.announce_port or port}"
        from hivemind.utils import get_dht_time

        self.started_at = get_dht_time()
        await self._connectivity.start(
            direct_address=self.address, tls_cert=self.tls.cert_pem.decode() if self.tls else "", bound_port=port,
            announce_now=self._announce_current)
        print(self._connectivity.describe(), flush=True)

        self._announcer = Announcer(
            self._dht, self.identity, self._make_record,
            period_s=config.announce_period_s, ttl_s=config.record_ttl_s,
        )
        if not await self._announcer.announce_once():
            logger.warning("first announcement failed; retrying in the background")
        self._announce_task = asyncio.create_task(self._announcer.run(), name="announce")
        self._announce_task.add_done_callback(_log_task_failure)
        self._start_balance_loops(num_layers)

    async def _announce_current(self) -> None:
        """Re-announces now with the current state (the relay changed, or the reachability verdict)."""
        if self._announcer is not None:
            await self._announcer.announce_once(self._announcer.state)

    # -- balance: pings to the next layers' peers, periodic re-checks, moving (docs/routing.md) ------
    def _start_balance_loops(self, num_layers: int) -> None:
        config = self.config
        assert self.identity is not None and self._sessions is not None and self._announcer is not None

        async def read_records() -> list[PeerRecord]:
            return await fetch_records(self._dht, self.model_name, peer_filter=config.peer_filter)

        def span() -> tuple[int, int]:
            assert self.config.start_layer is not None and self.config.end_layer is not None
            return self.config.start_layer, self.config.end_layer

        if config.ping_period_s > 0:
            self._pings = NextHopPings(self.identity.peer_id, lambda: span()[1], read_records,
                                       period_s=config.ping_period_s)
            self._loops.append(asyncio.create_task(self._pings.run(), name="pings"))
        if self.auto_span and config.rebalance_period_s > 0:
            mover = SpanMover(self._sessions, self._announcer.announce_state, span, self._load_span,
                              self._unload_span, self._install_span, drain_s=config.move_drain_s)
            self._rebalancer = Rebalancer(self.identity.peer_id, num_layers, span, read_records, mover.move,
                                          period_s=config.rebalance_period_s, min_gain=config.rebalance_min_gain)
            self._loops.append(asyncio.create_task(self._rebalancer.run(), name="rebalance"))
        for task in self._loops:
            task.add_done_callback(_log_task_failure)

    async def _load_span(self, start: int, end: int) -> Any:
        config = self.config
        dtype = COMPUTE_DTYPES[config.dtype]
        return await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: quantize_span(
                load_span(config.model, start, end, dtype=dtype, device=config.device, revision=config.revision,
                          config=self._model_config),
                config.quantization, config.device,
            ),
        )

    async def _unload_span(self) -> None:
        """Drops the span (after steps queued on the compute thread); compute is refused until install."""
        assert self._executor is not None
        executor = self._executor

        def drop() -> None:
            executor.span = Unloaded()  # type: ignore[assignment]

        await executor.run_exclusive(drop)
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    async def _install_span(self, span: Any, start: int, end: int) -> None:
        """Puts a loaded span in service: the compute thread, the servicer and sessions see it at once."""
        assert self._executor is not None and self._servicer is not None and self._sessions is not None
        executor = self._executor
        new_config = replace(self.config, start_layer=start, end_layer=end)

        def swap() -> None:
            executor.span = span

        await executor.run_exclusive(swap)
        self.config = self._servicer.config = self._sessions.config = new_config

    def _make_record(self, state: str) -> PeerRecord:
        from hivemind.utils import get_dht_time

        assert self.identity is not None and self._sessions is not None
        return PeerRecord(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key.hex(),
            model_name=self.model_name,
            start_layer=self.config.start_layer,
            end_layer=self.config.end_layer,
            num_layers=self._sessions.args.num_layers,
            dtype=self.config.dtype,
            quantization=self.config.quantization,
            throughput=self.throughput,
            prefill_throughput=self.prefill_throughput,
            pings=self._pings.current() if self._pings is not None else {},
            free_cache_tokens=self._sessions.pool.free_tokens,
            state=state,  # type: ignore[arg-type]
            signed_at=get_dht_time(),
            started_at=self.started_at,
            software_version=__version__,
            tls_cert=self.tls.cert_pem.decode() if self.tls else "",
            tls_spki_sha256=self.tls.spki_sha256 if self.tls else "",
            **(self._connectivity.record_fields() if self._connectivity else {"address": self.address}),
        )

    def ready_line(self) -> str:
        assert self.identity is not None
        info = {
            "peer_id": self.identity.peer_id,
            "address": self.address,
            "model_name": self.model_name,
            "layers": f"{self.config.start_layer}:{self.config.end_layer}",
            "quantization": self.config.quantization,
            "cache_tokens": self.config.cache_tokens,
            "throughput": round(self.throughput, 2),
            "tls_cert": self.tls.cert_pem.decode() if self.tls else "",
            "prefill_throughput": round(self.prefill_throughput, 2),
            **(self._connectivity.ready_fields() if self._connectivity else {}),
        }
        return f"{PEER_READY} {json.dumps(info)}"

    async def serve_until_stopped(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(self.ready_line(), flush=True)
        await stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Leaves politely: tell the DHT, refuse new sessions, let open ones finish for a while."""
        for task in self._loops:
            task.cancel()
        if self._sessions is not None:
            self._sessions.accepting = False
        if self._announce_task is not None:
            self._announce_task.cancel()
        if self._announcer is not None:
            await self._announcer.announce_leaving()
        deadline = asyncio.get_running_loop().time() + self.config.drain_grace_s
        while self._sessions and self._sessions.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        await self.close()

    async def close(self) -> None:
        for task in self._loops:
            task.cancel()
        if self._announce_task is not None:
            self._announce_task.cancel()
        if self._connectivity is not None:
            await self._connectivity.close()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._servicer is not None:
            await self._servicer.close()
        if self._executor is not None:
            self._executor.close()
        if self._dht is not None:
            self._dht.shutdown()


def _node_filter(config: PeerConfig) -> PeerFilter | None:
    """What this peer's DHT node itself refuses to store: non-members of a private swarm's allowlist.

    Not the blocklist: a node that refuses one subkey refuses the whole entry of a model in the
    answers of other nodes (hivemind validates a dictionary as one), so in a public swarm a blocked
    peer's record would hide every peer of the model from this one. Blocked peers are dropped when
    records are read instead. An allowlist is safe because every node of a private swarm has it.
    """
    return None if config.allowed_peers is None else PeerFilter(config.allowed_peers)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


class PeerStartError(RuntimeError):
    """The peer cannot serve this checkpoint or plan: one line saying why and what to do."""


# What start-up can meet in a volunteer's setup (a checkpoint, a config, a budget), as opposed to bugs.
# OSError: files, disks and downloads (the Hub client's errors are OSErrors too).
STARTUP_ERRORS = (UnsupportedModelError, CheckpointError, CheckpointMismatchError, DhtStartError, PlanError, OSError)


async def run_peer(config: PeerConfig) -> None:
    server = PeerServer(config)
    try:
        await server.start()
    except STARTUP_ERRORS as error:
        logger.debug("start-up failed", exc_info=True)  # the traceback, for whoever runs with debug logs
        await server.close()
        raise PeerStartError(" ".join(str(error).split())) from error
    except Exception:
        await server.close()
        raise
    await server.serve_until_stopped()


def main(config: PeerConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run_peer(config))
    except PeerStartError as error:
        print(f"brigade peer: cannot serve {config.model}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
