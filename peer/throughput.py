"""A peer's own compute speed: measured once per hardware/model shape/dtype/quantization, then cached.

Routing weighs peers by what they announce: tokens/s per layer for one decode step (batch 1,
short context) and for a prefill chunk. Measuring takes a few seconds on a big span, and a
volunteer restarts often, so the figures are kept in a small JSON file (``throughput.json``
under the user's cache folder) keyed by everything that changes them. The file is bounded
(``MAX_ENTRIES``, oldest dropped) and a corrupt or foreign file is ignored and rewritten: the
cache can only save time, never stop a peer from starting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from brigade.kernels.cache import KVCache
from brigade.kernels.span import ModelArgs, Span

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 128  # positions in the measured prefill step
MAX_ENTRIES = 64  # cached measurements kept; the oldest go first
MAX_CACHE_FILE_BYTES = 1 << 20  # a bigger file is not ours: ignore it
FORMAT = 1


@dataclass(frozen=True)
class Throughput:
    decode: float  # tokens/s per layer: batch-1 decode steps at a short context
    prefill: float  # tokens/s per layer: one prefill chunk of PREFILL_CHUNK positions (0 = unknown)


def measure(span: Span, dtype: torch.dtype, device: str, *, steps: int = 6,
            chunk: int = PREFILL_CHUNK) -> Throughput:
    """Times the span itself: the median decode step and the best of two prefill chunks.

    Blocks for a few seconds on a large span; run it off the event loop.
    """
    args = span.args
    chunk = max(1, min(chunk, args.max_position_embeddings - 1 - steps))
    layers = span.end - span.start
    pads = torch.zeros(1, dtype=torch.long, device=device)

    def fresh_cache() -> KVCache:
        return args.new_cache(span.start, span.end, 1, chunk + steps + 1, dtype, device)

    def timed(hidden: torch.Tensor, cache: KVCache) -> float:
        began = time.perf_counter()
        span(hidden, pads, cache)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - began

    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = (torch.randn(1, chunk, args.hidden_size, generator=generator) * 0.1).to(device=device, dtype=dtype)
    timed(prompt, fresh_cache())  # warm-up: first-call allocations, kernel selection
    prefill_s = min(timed(prompt, fresh_cache()) for _ in range(2))
    cache = fresh_cache()
    timed(prompt, cache)
    decode_s = sorted(timed(prompt[:, :1], cache) for _ in range(steps))[steps // 2]
    return Throughput(
        decode=1.0 / max(decode_s / layers, 1e-9),
        prefill=chunk / max(prefill_s / layers, 1e-9),
    )


def hardware_id(device: str) -> str:
    """What the figure depends on besides the model: the device, and on CPU the threads torch uses."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        return f"cuda:{properties.name}:{properties.major}.{properties.minor}:{properties.total_memory}"
    return f"cpu:{platform.machine()}:{_cpu_model()}:threads={torch.get_num_threads()}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cache_key(hardware: str, args: ModelArgs, dtype: torch.dtype, quantization: str) -> str:
    """Everything a per-layer figure depends on: the device, the layer's shape (not the layer count),
    the dtype, the quantization and the torch build."""
    shape = {key: value for key, value in asdict(args).items() if key != "num_layers"}
    fields = {"format": FORMAT, "hardware": hardware, "shape": shape, "dtype": str(dtype),
              "quantization": quantization, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "brigade" / "throughput.json"


class ThroughputCache:
    """A bounded JSON file of measurements; every read and write failure is logged and survived."""

    def __init__(self, path: Path, max_entries: int = MAX_ENTRIES):
        self.path = path
        self.max_entries = max_entries

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            if self.path.stat().st_size > MAX_CACHE_FILE_BYTES:
                logger.warning("ignoring %s: too big to be a throughput cache", self.path)
                return {}
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable throughput cache %s (%s); it will be rewritten", self.path, error)
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == FORMAT else None
        return {key: value for key, value in entries.items() if isinstance(value, dict)} if isinstance(
            entries, dict) else {}

    def get(self, key: str) -> Throughput | None:
        entry = self._read().get(key)
        if entry is None:
            return None
        decode, prefill = entry.get("decode"), entry.get("prefill")
        if not all(isinstance(value, int | float) and math.isfinite(value) and value >= 0
                   for value in (decode, prefill)) or not decode:
            return None
        return Throughput(float(decode), float(prefill))

    def put(self, key: str, value: Throughput) -> None:
        entries = self._read()
        entries[key] = {"decode": value.decode, "prefill": value.prefill, "measured_at": time.time()}
        newest = sorted(entries.items(), key=lambda item: float(item[1].get("measured_at") or 0), reverse=True)
        payload = json.dumps({"format": FORMAT, "entries": dict(newest[: self.max_entries])}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a peer killed mid-write, or two peers writing at once, never leave half a file.
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".throughput-", suffix=".json")
            with os.fdopen(handle, "w") as file:
                file.write(payload)
            os.replace(temporary, self.path)
        except OSError as error:
            logger.warning("could not write the throughput cache %s: %s", self.path, error)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(temporary)


def parse_throughput_option(text: str) -> str | Throughput:
    """``auto`` | ``eval`` | ``DECODE`` | ``DECODE:PREFILL`` (tokens/s per layer, for tests and fixed setups)."""
    if text in ("auto", "eval"):
        return text
    try:
        parts = [float(part) for part in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(math.isfinite(part) and part > 0 for part in parts):
        raise ValueError(f"throughput must be auto, eval, DECODE or DECODE:PREFILL (positive numbers), got {text!r}")
    return Throughput(parts[0], parts[1] if len(parts) == 2 else 0.0)


def cache_path_for(option: str | None) -> Path | None:
    """``--throughput-cache``: None = the default file, "" = no cache, else that file."""
    if option is None:
        return default_cache_path()
    return Path(option).expanduser() if option else None


def known_throughput(args: ModelArgs, dtype: torch.dtype, device: str, quantization: str, option: str,
                     cache_path: Path | None) -> Throughput | None:
    """What the peer will announce, if it is known before loading (fixed, or cached): span choice uses it."""
    chosen = parse_throughput_option(option)
    if isinstance(chosen, Throughput):
        return chosen
    if chosen == "eval" or cache_path is None:
        return None
    return ThroughputCache(cache_path).get(cache_key(hardware_id(device), args, dtype, quantization))


def self_throughput(span: Span, dtype: torch.dtype, device: str, quantization: str, option: str,
                    cache_path: Path | None) -> Throughput:
    """The figures to announce: fixed by ``option``, else cached, else measured (and cached).

    ``option`` "eval" measures even when cached; ``cache_path`` None keeps nothing on disk.
    Blocks while measuring: run it off the event loop.
    """
    chosen = parse_throughput_option(option)
    if isinstance(chosen, Throughput):
        return chosen
    cache = ThroughputCache(cache_path) if cache_path is not None else None
    key = cache_key(hardware_id(device), span.args, dtype, quantization)
    if chosen == "auto" and cache is not None and (cached := cache.get(key)) is not None:
        logger.info("throughput from cache: %.1f tokens/s per layer (decode), %.1f (prefill)",
                    cached.decode, cached.prefill)
        return cached
    measured = measure(span, dtype, device)
    logger.info("measured throughput: %.1f tokens/s per layer (decode), %.1f (prefill)",
                measured.decode, measured.prefill)
    if cache is not None:
        cache.put(key, measured)
    return measured
