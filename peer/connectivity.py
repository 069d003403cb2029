"""How clients reach this peer: the reachability verdict, relaying for others, being relayed.

One object per peer process that owns the three parts of docs/relays.md, so the server only has
to register its services, start it, and put ``record_fields()`` in every record it announces:

- the ``Probe`` service (every peer answers others' probes) and this peer's own verdict, checked
  at start and again every ``reachability_period_s`` (every minute while unknown), so a volunteer
  who forwards the port later goes direct without a restart;
- with ``--relay`` (and only while this peer is reachable itself), the ``Relay`` service and its
  relay port;
- while unreachable, a ``RelayedLink`` that keeps it registered with a relay and re-announces
  whenever the relay changes or is lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from brigade.peer.config import PeerConfig
from brigade.peer.reachability import MAX_PROBERS, ProbeService, Verdict, advice, check_reachability
from brigade.peer.relay import RelayLimits, RelayListener, RelayService
from brigade.peer.relayed import RelayedLink, RelayState, relay_candidates
from brigade.protocol import brigade_pb2_grpc as pb_grpc
from brigade.protocol.identity import Identity
from brigade.protocol.records import PeerRecord, parse_address
from brigade.protocol.targets import dialable
from brigade.routing.swarm import fetch_index, fetch_records

logger = logging.getLogger(__name__)

UNKNOWN_RECHECK_S = (5.0, 60.0)  # while no other peer could be asked: first re-check, doubling up to the last
MAX_OTHER_MODELS = 8  # other models' peers read when this model's peers offer no prober or relay


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def local_backend(config: PeerConfig, bound_port: int) -> tuple[str, int]:
    """Where relayed connections are handed over: ``relayed_backend``, else this peer's own gRPC port."""
    if config.relayed_backend:
        parsed = parse_address(config.relayed_backend)
        if parsed is None:
            raise ValueError(f"relayed_backend {config.relayed_backend!r} is not host:port")
        return parsed
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    return host.strip("[]"), bound_port


class Connectivity:
    """Reachability, relaying and being relayed for one peer. ``start`` does the I/O; ``close`` ends it."""

    def __init__(self, config: PeerConfig, identity: Identity, dht: Any, model_name: str):
        if config.reachability not in ("auto", "direct", "relayed"):
            raise ValueError(f"reachability must be auto, direct or relayed, got {config.reachability!r}")
        self.config = config
        self.identity = identity
        self.model_name = model_name
        self._dht = dht
        self.verdict: Verdict | None = None
        self.direct_address = ""
        self.relay_address = ""  # where this peer relays for others (when --relay and reachable)
        self.relay_service: RelayService | None = None
        self._listener: RelayListener | None = None
        self._link: RelayedLink | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._link_task: asyncio.Task[None] | None = None
        self._announce_now: Callable[[], Awaitable[Any]] | None = None
        self._tls_cert = ""
        self._bound_port = 0
        self._rng = random.Random()

    # -- set-up ----------------------------------------------------------------------------------
    def add_services(self, server: grpc.aio.Server) -> None:
        """Registers ``Probe`` (always) and ``Relay`` (with ``--relay``) on the peer's gRPC server."""
        pb_grpc.add_ReachabilityServicer_to_server(
            ProbeService(self.identity.peer_id, allow_insecure=self.config.insecure,
                         allow_private=self.config.allows_private_targets), server)
        if self.config.relay:
            limits = RelayLimits(
                max_peers=self.config.relay_max_peers, max_connections=self.config.relay_max_connections,
                max_connections_per_peer=self.config.relay_max_connections_per_peer,
                max_bytes_per_hour=self.config.relay_max_bytes_per_hour)
            self.relay_service = RelayService(self.identity.peer_id, lambda: self.relay_address, limits,
                                              admits=self.config.peer_filter.admits)
            pb_grpc.add_RelayServicer_to_server(self.relay_service, server)

    async def start(self, *, direct_address: str, tls_cert: str, bound_port: int,
                    announce_now: Callable[[], Awaitable[Any]]) -> None:
        """Checks reachability and, when unreachable, registers with a relay (each step bounded).

        ``direct_address`` is what this peer would announce without a relay; ``announce_now()``
        re-announces the record (its fields come from ``record_fields``).
        """
        config = self.config
        self.direct_address, self._tls_cert, self._bound_port = direct_address, tls_cert, bound_port
        self._announce_now = announce_now
        if self.relay_service is not None:
            self._listener = RelayListener(self.relay_service, config.host, config.relay_port)
            relay_port = await self._listener.start()
            host = config.announce_host or config.host
            self.relay_address = _join(host, config.relay_announce_port or relay_port)
        if config.reachability == "direct":
            self.verdict = Verdict(None, direct_address, reason="not checked (--reachability direct)")
        elif config.reachability == "relayed":
            self.verdict = Verdict(False, direct_address, reason="not checked: always relayed (--reachability relayed)")
        else:
            self.verdict = await self._probe()
        if self.verdict.reachable is False:
            await self._start_link(wait_s=config.relay_wait_s)
        if config.reachability == "auto" and config.reachability_period_s > 0:
            self._own(asyncio.create_task(self._monitor(), name="reachability"))

    def _own(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.append(task)
        task.add_done_callback(_log_failure)
        return task

    async def _probe(self) -> Verdict:
        records = await self._records(lambda found: len(found) >= MAX_PROBERS)
        return await check_reachability(self.identity, self.direct_address, self._tls_cert, records,
                                        timeout_s=self.config.probe_timeout_s, allow_insecure=self.config.insecure,
                                        rng=self._rng)

    async def _records(self, enough: Callable[[list[PeerRecord]], bool]) -> list[PeerRecord]:
        """This model's records, plus other models' when they are not ``enough`` (a new model's first peers)."""
        # Probers and relays are dialed on their records' word: the peer filter and, outside a private
        # swarm, public addresses only (protocol/targets.py).
        allow_private, peer_filter = self.config.allows_private_targets, self.config.peer_filter
        records = dialable(await fetch_records(self._dht, self.model_name, peer_filter=peer_filter),
                           allow_private=allow_private)
        if enough(records):
            return records
        names = sorted({entry.model_name for entry in await fetch_index(self._dht)} - {self.model_name})
        self._rng.shuffle(names)
        for name in names[:MAX_OTHER_MODELS]:
            records += dialable(await fetch_records(self._dht, name, peer_filter=peer_filter),
                                allow_private=allow_private)
        return records

    async def _find_relays(self) -> list[PeerRecord]:
        return await self._records(lambda found: bool(relay_candidates(found, self.identity.peer_id)))

    # -- being relayed -----------------------------------------------------------------------------
    async def _start_link(self, wait_s: float) -> None:
        if self.config.insecure:
            logger.error("an --insecure peer is never relayed (the relay would see plain text); it stays unreachable")
            return
        self._link = RelayedLink(
            self.identity, self._tls_cert, local_backend(self.config, self._bound_port), self._find_relays,
            self._relay_changed,
            allow_insecure=self.config.insecure, max_connections=self.config.relay_max_connections_per_peer)
        self._link_task = self._own(asyncio.create_task(self._link.run(), name="relayed-link"))
        try:
            async with asyncio.timeout(wait_s):
                await self._link.registered.wait()
        except TimeoutError:
            logger.warning("no relay within %.0f s; announcing without one (clients skip this peer) and "
                           "still looking", wait_s)

    async def _stop_link(self) -> None:
        if self._link_task is not None:
            self._link_task.cancel()
            await asyncio.gather(self._link_task, return_exceptions=True)
        self._link, self._link_task = None, None

    async def _relay_changed(self, state: RelayState | None) -> None:
        if state is None:
            logger.warning("lost the relay; clients cannot reach this peer until it finds another")
        else:
            logger.info("clients reach this peer through relay %s at %s", state.relay_id, state.address)
        if self._announce_now is not None:
            await self._announce_now()

    @property
    def relay(self) -> RelayState | None:
        return self._link.current if self._link is not None else None

    # -- re-checks ---------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        """Re-checks every period; while unknown (peers of a swarm that starts together find nobody to
        ask at first) soon and then less often: 5 s, 10 s, ... up to a minute."""
        unknown_delay = UNKNOWN_RECHECK_S[0]
        while True:
            if self.verdict is None or self.verdict.reachable is None:
                period = min(unknown_delay, self.config.reachability_period_s)
                unknown_delay = min(2 * unknown_delay, UNKNOWN_RECHECK_S[1])
            else:
                period, unknown_delay = self.config.reachability_period_s, UNKNOWN_RECHECK_S[0]
            await asyncio.sleep(period * self._rng.uniform(0.8, 1.2))
            try:
                verdict = await self._probe()
            except Exception:  # a DHT hiccup: keep the verdict we have
                logger.warning("re-checking reachability failed", exc_info=True)
                continue
            if verdict.reachable is None:
                continue
            before = self.verdict.reachable if self.verdict else None
            self.verdict = verdict
            if verdict.reachable is False and self._link is None:
                logger.warning("this peer is no longer reachable: %s\n  %s", verdict.summary(), self._advice())
                await self._start_link(wait_s=self.config.relay_wait_s)
            elif verdict.reachable and self._link is not None:
                logger.warning("this peer is reachable directly now (%s); leaving its relay", verdict.summary())
                await self._stop_link()
            elif before == verdict.reachable:
                continue
            if self._announce_now is not None:
                await self._announce_now()

    # -- what to announce and print ----------------------------------------------------------------
    def record_fields(self) -> dict[str, Any]:
        """The record's address and reachability fields (the relay's address while relayed)."""
        reachable = self.verdict.reachable if self.verdict is not None else None
        fields: dict[str, Any] = {"address": self.direct_address, "reachable": reachable}
        relay = self.relay
        if relay is not None:
            fields.update(address=relay.address, relay_peer_id=relay.relay_id)
        if self.relay_address and reachable is not False:
            fields["relay_address"] = self.relay_address
        return fields

    def ready_fields(self) -> dict[str, Any]:
        relay = self.relay
        return {
            "reachable": self.verdict.reachable if self.verdict else None,
            "relay_peer_id": relay.relay_id if relay else "",
            "announced_address": relay.address if relay else self.direct_address,
            "relay_address": self.relay_address,
        }

    def _advice(self) -> str:
        config = self.config
        return advice(self.verdict or Verdict(False, self.direct_address), bound_port=self._bound_port,
                      announce_host=config.announce_host or config.host,
                      announce_port=config.announce_port or self._bound_port)

    def describe(self) -> str:
        """What ``brigade peer run`` prints about reachability, in plain words."""
        verdict = self.verdict or Verdict(None, self.direct_address)
        if verdict.reachable:
            lines = [f"reachability: reachable at {self.direct_address} ({verdict.summary()})"]
        elif verdict.reachable is None:
            later = (f"; checking again in {min(UNKNOWN_RECHECK_S[0], self.config.reachability_period_s):.0f} s"
                     if self.config.reachability == "auto" and self.config.reachability_period_s > 0 else "")
            lines = [f"reachability: {verdict.summary()}{later}; announcing {self.direct_address}"]
        else:
            lines = [f"reachability: NOT reachable at {self.direct_address}: {verdict.summary()}"]
            if not verdict.reason:
                lines.append("  " + self._advice())
            relay = self.relay
            if relay is not None:
                lines.append(f"  serving through relay {relay.relay_id}: clients reach this peer at {relay.address}")
            elif self.config.insecure:
                lines.append("  an --insecure peer is never relayed: clients cannot use it")
            else:
                lines.append("  no relay yet: clients cannot use this peer until one is found (still looking)")
        if self.relay_service is not None:
            if self.relay_address and verdict.reachable is not False:
                limits = self.relay_service.limits
                budget = f"{limits.max_bytes_per_hour / 2**30:g} GiB/hour each" if limits.max_bytes_per_hour > 0 \
                    else "no byte cap"
                lines.append(f"relay: relaying for unreachable peers at {self.relay_address} (up to "
                             f"{limits.max_peers} peers, {limits.max_connections} connections, {budget})")
            else:
                lines.append("relay: not offered while this peer is not reachable itself")
        return "\n".join(lines)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
