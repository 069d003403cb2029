"""The stages that build a peer process, each one kind of I/O, run in order by ``PeerServer.create``.

identity (a key file) -> dht (a node, bootstrapped) -> planning (the checkpoint's config, the
swarm's records, the throughput known before loading, the memory budget) -> loading (the span's
weights) -> throughput (measured on the loaded span unless known) -> tls (a certificate) ->
services (the compute thread, the gRPC server bound and started). Announcing, the last stage,
is the server's own (``PeerServer._go_online``): it needs the running peer to build its record.

Each stage hands its result to the next instead of filling in attributes of a half-built object;
``create`` registers what must be stopped as it goes, so a failed stage stops what started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from brigade.kernels.families import model_args
from brigade.kernels.loading import COMPUTE_DTYPES, load_config, load_span
from brigade.kernels.memory import PlanError, SpanPlan
from brigade.kernels.quant import quantize_span
from brigade.kernels.span import Span
from brigade.peer.config import PeerConfig
from brigade.peer.connectivity import Connectivity
from brigade.peer.executor import SpanExecutor
from brigade.peer.forwarding import ForwardChannels
from brigade.peer.planning import resolve_span
from brigade.peer.servicer import PeerServicer
from brigade.peer.sessions import SessionManager
from brigade.peer.throughput import Throughput, cache_path_for, known_throughput, self_throughput
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.channel_options import grpc_options
from brigade.protocol.identity import Identity
from brigade.protocol.tls import TlsIdentity
from brigade.routing.dht import start_dht
from brigade.routing.peer_filter import PeerFilter
from brigade.routing.swarm import fetch_records

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Logs how long a start-up stage took, or that it failed (the error itself is the caller's to report)."""
    began = time.monotonic()
    try:
        yield
    except BaseException:
        logger.debug("start-up stage %s failed after %.1f s", name, time.monotonic() - began)
        raise
    logger.info("start-up stage %s done in %.1f s", name, time.monotonic() - began)


# -- identity --------------------------------------------------------------------------------------
def load_identity(config: PeerConfig) -> tuple[PeerConfig, Identity]:
    """The peer's key (from its file, created on first run, or fresh), and the config that admits it."""
    identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
    if config.allowed_peers is not None and identity.peer_id not in config.allowed_peers:
        # A private swarm's member list need not name each member's own id: its node must keep its own record.
        config = replace(config, allowed_peers=config.allowed_peers | {identity.peer_id})
    return config, identity


# -- dht -------------------------------------------------------------------------------------------
async def start_dht_node(config: PeerConfig) -> Any:
    """This peer's DHT node, joined to ``initial_peers`` (hivemind starts it in a process of its own)."""
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: start_dht(config.initial_peers, listen_maddrs=config.dht_listen,
                                peer_filter=node_filter(config)))


def node_filter(config: PeerConfig) -> PeerFilter | None:
    """What this peer's DHT node itself refuses to store: non-members of a private swarm's allowlist.

    Not the blocklist: a node that refuses one subkey refuses the whole entry of a model in the
    answers of other nodes (hivemind validates a dictionary as one), so in a public swarm a blocked
    peer's record would hide every peer of the model from this one. Blocked peers are dropped when
    records are read instead. An allowlist is safe because every node of a private swarm has it.
    """
    return None if config.allowed_peers is None else PeerFilter(config.allowed_peers)


# -- planning --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What planning decided: the span and cache size (in ``config``), and what it read to decide."""

    config: PeerConfig  # start_layer, end_layer and cache_tokens set
    model_config: Any  # the checkpoint's transformers config
    span_plan: SpanPlan
    throughput_cache: Path | None  # where measurements are kept (None: nowhere)


async def plan(config: PeerConfig, dht: Any, model_name: str) -> Plan:
    """Chooses the span (from the swarm's records when --layers auto) and sizes the KV cache."""
    model_config = load_config(config.model, config.revision)
    num_layers = model_config.num_hidden_layers
    if config.start_layer is not None and not 0 <= config.start_layer < (config.end_layer or 0) <= num_layers:
        raise PlanError(f"--layers {config.start_layer}:{config.end_layer} is outside the model's {num_layers} "
                        "layers")
    records = (await fetch_records(dht, model_name, peer_filter=config.peer_filter)
               if config.start_layer is None else [])
    cache_path = cache_path_for(config.throughput_cache)
    known = known_throughput(model_args(model_config), COMPUTE_DTYPES[config.dtype], config.device,
                             config.quantization, config.throughput, cache_path)
    config, span_plan = resolve_span(config, model_config, records, throughput=known.decode if known else None)
    print(f"plan: layers {config.start_layer}:{config.end_layer} at {config.dtype}/{config.quantization}: "
          f"{span_plan.describe()}", flush=True)
    return Plan(config, model_config, span_plan, cache_path)


# -- loading ---------------------------------------------------------------------------------------
async def load(config: PeerConfig, model_config: Any, start: int, end: int) -> Span:
    """Layers ``[start, end)``, only their tensors read, quantized as configured (off the event loop)."""
    dtype = COMPUTE_DTYPES[config.dtype]
    return await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: quantize_span(
            load_span(config.model, start, end, dtype=dtype, device=config.device, revision=config.revision,
                      config=model_config),
            config.quantization, config.device,
        ),
    )


# -- throughput ------------------------------------------------------------------------------------
async def measure(config: PeerConfig, span: Span, cache_path: Path | None) -> Throughput:
    """What to announce: fixed by --throughput, else cached for this hardware, else measured now."""
    return await asyncio.get_running_loop().run_in_executor(
        None, self_throughput, span, COMPUTE_DTYPES[config.dtype], config.device, config.quantization,
        config.throughput, cache_path)


# -- tls -------------------------------------------------------------------------------------------
def make_tls(config: PeerConfig, identity: Identity) -> TlsIdentity | None:
    """A certificate bound to the peer's id (announced in its record); none for --insecure swarms."""
    return None if config.insecure else TlsIdentity.generate(identity.peer_id)


# -- services --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Services:
    """The running parts that serve requests; all started, each to be stopped by its owner."""

    sessions: SessionManager
    executor: SpanExecutor
    servicer: PeerServicer
    server: grpc.aio.Server
    connectivity: Connectivity
    port: int  # the bound gRPC port
    address: str  # what clients dial without a relay


async def serve(config: PeerConfig, identity: Identity, model_name: str, span: Span, dht: Any,
                tls: TlsIdentity | None, info_extra: Callable[[], dict[str, Any]],
                stack: contextlib.AsyncExitStack) -> Services:
    """Starts the compute thread and the gRPC server (Peer, Reachability, Relay) on the configured port."""
    dtype = COMPUTE_DTYPES[config.dtype]
    sessions = SessionManager(config, span.args, dtype, config.device)
    executor = SpanExecutor(span, dtype, config.device, config.num_threads, max_batch_tokens=config.max_batch_tokens,
                            batch_window_s=config.batch_window_ms / 1000, max_queued=config.max_queued_work,
                            max_queued_per_client=config.max_queued_work_per_client,
                            batch_invariant=config.batch_invariant)
    executor.start()
    stack.callback(executor.close)
    forward_channels = ForwardChannels(
        lambda: fetch_records(dht, model_name, peer_filter=config.peer_filter),
        allow_private=config.allows_private_targets, allow_insecure=config.insecure,
        max_message_bytes=config.max_message_bytes)
    servicer = PeerServicer(config, model_name, identity, sessions, executor, info_extra=info_extra,
                            forward_channels=forward_channels)
    stack.push_async_callback(servicer.close)
    server = grpc.aio.server(options=grpc_options(config.max_message_bytes))
    pb_grpc.add_PeerServicer_to_server(servicer, server)
    connectivity = Connectivity(config, identity, dht, model_name)
    connectivity.add_services(server)
    bind = f"{config.host}:{config.port}"
    port = server.add_insecure_port(bind) if tls is None else server.add_secure_port(bind, tls.server_credentials())
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    await server.start()
    stack.push_async_callback(server.stop, 1.0)
    stack.push_async_callback(connectivity.close)
    address = f"{config.announce_host or config.host}:{config.announce_port or port}"
    return Services(sessions, executor, servicer, server, connectivity, port, address)
