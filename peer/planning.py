"""Sizing a peer before it loads anything: which layers, how much KV cache, in what budget.

The plan is printed before loading, so a volunteer sees what the peer will take of the machine.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from brigade.kernels.families import model_args
from brigade.kernels.loading import COMPUTE_DTYPES
from brigade.kernels.memory import PlanError, SpanPlan, format_bytes, kv_bytes_per_token, layer_bytes, plan_span
from brigade.kernels.span import ModelArgs
from brigade.peer.config import PeerConfig
from brigade.peer.resources import available_bytes, resident_bytes
from brigade.protocol.records import PeerRecord
from brigade.routing.span_choice import choose_span

logger = logging.getLogger(__name__)


RUNTIME_RESERVE_BYTES = 32 << 20  # gRPC buffers, thread stacks and allocator slack a serving process grows into


def working_bytes(args: ModelArgs, config: PeerConfig) -> int:
    """What computing one pass takes beyond weights and cache: the activations of ``max_batch_tokens``
    positions (residual, norms, q/k/v/o, the MLP's gate, up and product) plus a runtime reserve.

    Without it a peer planned to the byte of its budget goes over it once it serves (seen: 704 MiB
    resident in a 700 MiB budget under load).
    """
    dtype_bytes = COMPUTE_DTYPES[config.dtype].itemsize
    intermediate = int(getattr(args, "intermediate_size", 0) or getattr(args, "ffn_hidden_size", 0)
                       or 4 * args.hidden_size)
    per_position = (6 * args.hidden_size + 3 * intermediate) * dtype_bytes
    return config.max_batch_tokens * per_position + RUNTIME_RESERVE_BYTES


def budget_and_overhead(config: PeerConfig, args: ModelArgs) -> tuple[int, int]:
    """The memory budget and what is spoken for before weights and cache: on CPU, what this process
    already holds and what a pass will need to compute; on CUDA, the pass only."""
    budget = config.max_memory_bytes or available_bytes(config.device) // 2
    held = 0 if config.device.startswith("cuda") else resident_bytes()
    return budget, held + working_bytes(args, config)


def resolve_span(
    config: PeerConfig, model_config: Any, records: list[PeerRecord], *, throughput: float | None = None
) -> tuple[PeerConfig, SpanPlan]:
    """The config with its span and cache size decided, and the plan that decided them.

    ``throughput`` (tokens/s per layer, when known before loading) weighs this peer in span choice.
    """
    args = model_args(model_config)
    dtype_bytes = COMPUTE_DTYPES[config.dtype].itemsize
    budget, overhead = budget_and_overhead(config, args)
    if config.start_layer is None or config.end_layer is None:
        plan = plan_span(args, budget, dtype_bytes, config.quantization, cache_share=config.cache_share,
                         overhead_bytes=overhead, max_layers=config.span_length)
        start, end = choose_span(records, args.num_layers, plan.num_layers, throughput=throughput)
    else:
        start, end = config.start_layer, config.end_layer
        count = end - start
        weights = count * layer_bytes(args, dtype_bytes, config.quantization)
        per_token = kv_bytes_per_token(args, dtype_bytes, count)
        left = budget - overhead - weights
        if left < per_token * config.cache_page_tokens:
            raise PlanError(
                f"layers {start}:{end} take {format_bytes(weights)} of weights, which leaves no room for a KV "
                f"cache in a {format_bytes(budget)} budget ({format_bytes(overhead)} already taken by this process "
                "and one pass's working memory); host fewer layers, quantize (--quant nf4), or raise --max-memory"
            )
        plan = SpanPlan(num_layers=count, weight_bytes=weights, cache_tokens=left // per_token,
                        cache_bytes=(left // per_token) * per_token, budget_bytes=budget)
    cache_tokens = config.cache_tokens or plan.cache_tokens
    return replace(config, start_layer=start, end_layer=end, cache_tokens=cache_tokens), plan
