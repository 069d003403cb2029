"""The dashboard's one background job: crawl the swarm on a period and publish what it found.

One crawl at a time, each bounded (``crawl_timeout_s``), each ending in a published, immutable
result: the models as JSON bytes and the Prometheus text, swapped in as whole references. Web
handlers only read those references, so a crawl of thousands of peers (parsing and signature
checks run in a worker thread, probes are awaited) never holds a request up.

The crawler also remembers what a single crawl cannot know: peers that left the DHT (shown as
gone for ``forget_after_s``), and a bounded history of each model's figures for the chart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from pydantic import TypeAdapter

from brigade import __version__
from brigade.dashboard.health import gone, history_point, model_view
from brigade.dashboard.metrics import render_metrics
from brigade.dashboard.probe import ProbeResult, probe_all
from brigade.dashboard.schema import SCHEMA_VERSION, CrawlView, HistoryPoint, ModelView, PeerView
from brigade.protocol.records import PeerRecord
from brigade.routing.crawl import CrawlError, SwarmCrawl, SwarmSource, crawl

logger = logging.getLogger(__name__)

_MODELS = TypeAdapter(list[ModelView])


@dataclass(frozen=True)
class CrawlerConfig:
    period_s: float = 30.0  # seconds from one crawl's start to the next one's
    probe_timeout_s: float = 2.0  # seconds one peer's probe may take, connecting included
    probe_concurrency: int = 32  # probes in flight at once; 0 = no probes (trust the records)
    read_concurrency: int = 8  # model reads from the DHT in flight at once
    crawl_timeout_s: float = 300.0  # a crawl still running after this many seconds is abandoned and reported
    history_s: float = 6 * 3600.0  # seconds of history kept for the chart
    history_points: int = 720  # points kept per model at most (older ones are thinned by spacing)
    forget_after_s: float = 900.0  # seconds a peer gone from the DHT is still listed (as gone)
    max_remembered: int = 20_000  # peers remembered at most, all models together
    join_retry_s: float = 10.0  # seconds before trying again to join a DHT that refused us
    allow_private: bool = False  # probe private, loopback and link-local addresses (a private swarm)

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.probe_timeout_s <= 0 or self.crawl_timeout_s <= 0:
            raise ValueError("period, probe timeout and crawl timeout must be positive")
        if self.probe_concurrency < 0 or self.read_concurrency < 1 or self.history_points < 2:
            raise ValueError("need probe_concurrency >= 0, read_concurrency >= 1, history_points >= 2")


@dataclass
class _Status:
    """The crawl loop's own bookkeeping (mutated on the event loop only)."""

    in_progress: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    ok: bool | None = None
    error: str = ""
    last_success_at: float | None = None
    crawls: int = 0
    failures: int = 0
    records_seen: int = 0
    records_dropped: int = 0
    peers_probed: int = 0
    models_skipped: int = 0


class Crawler:
    """Owns the source, the crawl task, and everything published from it. No I/O until ``start``."""

    def __init__(self, source: SwarmSource, config: CrawlerConfig | None = None):
        self.source = source
        self.config = config or CrawlerConfig()
        self._status = _Status()
        self._created_at = time.time()
        self._task: asyncio.Task[None] | None = None
        self._models: list[ModelView] = []
        self._models_json = b"[]"
        self._metrics = render_metrics([], self.crawl_view())
        # Touched only by the crawl (one at a time), in its worker thread or on the loop.
        self._last_records: dict[str, list[PeerRecord]] = {}
        self._remembered: dict[tuple[str, str], PeerView] = {}
        self._history: dict[str, deque[HistoryPoint]] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the crawl loop on the running event loop (joining the source is its first step)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="dashboard crawl loop")
            self._task.add_done_callback(_log_task_end)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, 10.0)
            except (asyncio.CancelledError, TimeoutError):
                pass
            except Exception:  # already logged by the done-callback
                pass
        await asyncio.to_thread(self.source.close)

    async def run(self) -> None:
        """Joins the source (retrying), then crawls every ``period_s`` until cancelled."""
        while True:
            try:
                await self.source.start()
                break
            except Exception as e:
                self._fail(f"could not join: {e}", None)
                logger.warning("could not join %s (%s); retrying in %.0f s", self.source.description, e,
                               self.config.join_retry_s)
                await asyncio.sleep(self.config.join_retry_s)
        while True:
            began = time.monotonic()
            await self.crawl_once()
            # Period counted from start to start; a crawl longer than the period is followed by a
            # short pause rather than an immediate next one, so the loop can never spin.
            await asyncio.sleep(max(self.config.period_s - (time.monotonic() - began), 0.05))

    # ---- one crawl -------------------------------------------------------------------------
    async def crawl_once(self) -> bool:
        """One bounded crawl; publishes its result (or its failure). True when it succeeded."""
        status = self._status
        status.in_progress, status.started_at = True, time.time()
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.config.crawl_timeout_s):
                result = await crawl(self.source, concurrency=self.config.read_concurrency)
                present = self._present_records(result)
                records = [record for model in present.values() for record in model]
                probes: dict[tuple[str, str], ProbeResult] = {}
                if self.config.probe_concurrency > 0:
                    probes = await probe_all(records, timeout_s=self.config.probe_timeout_s,
                                             concurrency=self.config.probe_concurrency,
                                             allow_private=self.config.allow_private)
        except TimeoutError:
            self._fail(f"the crawl took longer than {self.config.crawl_timeout_s:g} s and was abandoned", began)
            return False
        except CrawlError as e:
            self._fail(str(e), began)
            return False
        except Exception as e:  # a bug must show on the page and in the log, not stop the loop
            logger.exception("crawl failed")
            self._fail(f"internal error: {e!r}", began)
            return False
        # Outside the timeout: bounded CPU work that must not be abandoned half-way through its bookkeeping.
        seen_at = time.time()
        try:
            models, models_json = await asyncio.to_thread(self._build, result, present, probes, seen_at)
        except Exception as e:
            logger.exception("building the dashboard state failed")
            self._fail(f"internal error: {e!r}", began)
            return False
        self._models, self._models_json = models, models_json
        status.in_progress, status.ok, status.error = False, True, ""
        status.finished_at = status.last_success_at = time.time()
        status.duration_s = time.monotonic() - began
        status.crawls += 1
        status.records_seen, status.records_dropped = result.records_seen, result.records_dropped
        status.peers_probed, status.models_skipped = len(probes), result.models_skipped
        self._metrics = await asyncio.to_thread(render_metrics, models, self.crawl_view())
        logger.info("crawl: %d models, %d records (%d dropped), %d probed in %.2f s", len(models),
                    result.records_seen, result.records_dropped, len(probes), status.duration_s)
        return True

    def _fail(self, error: str, began: float | None) -> None:
        status = self._status
        status.in_progress, status.ok, status.error = False, False, error
        status.finished_at = time.time()
        status.duration_s = None if began is None else time.monotonic() - began
        status.crawls += 1
        status.failures += 1
        logger.warning("crawl failed: %s", error)
        self._metrics = render_metrics(self._models, self.crawl_view())

    def _present_records(self, result: SwarmCrawl) -> dict[str, list[PeerRecord]]:
        """Each model's records; for a model the source could not read, the ones read before."""
        present = {}
        for name, model in result.models.items():
            present[name] = self._last_records.get(name, []) if model.error else model.records
        return present

    def _build(
        self,
        result: SwarmCrawl,
        present: dict[str, list[PeerRecord]],
        probes: dict[tuple[str, str], ProbeResult],
        seen_at: float,
    ) -> tuple[list[ModelView], bytes]:
        """Runs in a worker thread: the views, the history, the memory of gone peers, the JSON."""
        config = self.config
        self._last_records = present
        here = {(name, record.peer_id) for name, records in present.items() for record in records}
        gone_peers: dict[str, list[PeerView]] = {}
        for key, view in list(self._remembered.items()):
            if key in here:
                continue
            if seen_at - view.last_seen_at > config.forget_after_s:
                del self._remembered[key]
            else:
                gone_peers.setdefault(key[0], []).append(gone(view))

        models = []
        for name in sorted(set(present) | set(gone_peers)):
            model = result.models.get(name)
            view = model_view(
                name,
                [(record, probes.get((name, record.peer_id))) for record in present.get(name, [])],
                seen_at,
                gone_peers=gone_peers.get(name, ()),
                records_dropped=model.dropped if model else 0,
                read_error=model.error if model else "",
            )
            for peer in view.peers:
                if peer.status != "gone":
                    self._remembered[name, peer.peer_id] = peer
            history = self._history.setdefault(name, deque(maxlen=config.history_points))
            _add_point(history, history_point(view, seen_at), config.history_s / config.history_points)
            while history and history[0].t < seen_at - config.history_s:
                history.popleft()
            models.append(view.model_copy(update={"history": list(history)}))
        for name in set(self._history) - {model.name for model in models}:
            del self._history[name]
        self._forget_oldest()
        return models, _MODELS.dump_json(models)

    def _forget_oldest(self) -> None:
        excess = len(self._remembered) - self.config.max_remembered
        if excess > 0:
            oldest = sorted(self._remembered, key=lambda key: self._remembered[key].last_seen_at)[:excess]
            for key in oldest:
                del self._remembered[key]

    # ---- what the web handlers read --------------------------------------------------------
    @property
    def models(self) -> list[ModelView]:
        return self._models

    def crawl_view(self) -> CrawlView:
        status = self._status
        return CrawlView(
            source=self.source.description, period_s=self.config.period_s, in_progress=status.in_progress,
            started_at=status.started_at, finished_at=status.finished_at, duration_s=status.duration_s,
            ok=status.ok, error=status.error, last_success_at=status.last_success_at, crawls=status.crawls,
            failures=status.failures, records_seen=status.records_seen, records_dropped=status.records_dropped,
            peers_probed=status.peers_probed, models_skipped=status.models_skipped,
        )

    def state_json(self) -> bytes:
        """The ``DashboardState`` document: the live crawl status around the models of the last crawl.

        The models part is serialized once per crawl; only this small envelope is built per request.
        """
        head = (f'{{"schema_version":{SCHEMA_VERSION},"software_version":"{__version__}",'
                f'"generated_at":{time.time():.3f},"crawl":').encode()
        return head + self.crawl_view().model_dump_json().encode() + b',"models":' + self._models_json + b"}"

    def metrics_text(self) -> bytes:
        return self._metrics

    def health(self) -> tuple[bool, str]:
        """Whether the service itself works: the crawl loop runs and finishes crawls (failed ones count)."""
        if self._task is not None and self._task.done():
            return False, "the crawl loop has stopped"
        last = self._status.finished_at or self._created_at
        allowed = self.config.period_s + self.config.crawl_timeout_s + 60.0  # every crawl ends within its timeout
        if time.time() - last > allowed:
            return False, f"no crawl has finished for {time.time() - last:.0f} s"
        return True, "ok"


def _add_point(history: deque[HistoryPoint], point: HistoryPoint, spacing_s: float) -> None:
    """Keeps points at least ``spacing_s`` apart, except the newest, which always shows the last crawl."""
    if len(history) >= 2 and point.t - history[-2].t < spacing_s * 0.99:
        history[-1] = point
    else:
        history.append(point)


def _log_task_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the dashboard crawl loop died", exc_info=task.exception())

