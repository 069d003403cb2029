"""The stateless forward (``model(input_ids)``): one pass over full sequences, hop by hop, nothing kept.

It routes and recovers as a session does: a hop that fails or answers wrongly (whatever status it
answers with) is banned and its remaining layers re-routed, within the same retry budget; what the
caller asked for is checked here, before anything is sent.
"""

from __future__ import annotations

import logging

import torch

from brigade.client.budget import Budget
from brigade.client.hops import HopFailure, classify
from brigade.client.remote import RemoteSwarm
from brigade.client.standing import PeerStanding
from brigade.protocol import brigade_pb2 as pb
from brigade.protocol.errors import BadAnswerError
from brigade.protocol.messages import forward_answer
from brigade.protocol.tensors import WIRE_DTYPES, encode
from brigade.protocol.tokens import make_token

logger = logging.getLogger(__name__)


async def forward_through(swarm: RemoteSwarm, standing: PeerStanding, hidden: torch.Tensor,
                          pads: list[int]) -> tuple[torch.Tensor, list[str]]:
    """``hidden`` [B, T, H] through every layer; returns the output and the route it took."""
    config = swarm.config
    wire = WIRE_DTYPES[config.wire_dtype]
    budget = Budget(config.retry_budget_s, config.max_attempts)
    position, used, fresh = 0, [], False
    while position < swarm.num_layers:
        hop = (await swarm.route(position, swarm.num_layers, exclude=standing.excluded(), fresh=fresh,
                                 wait_s=max(0.0, min(config.route_wait_s, budget.remaining_s()))))[0]
        request = pb.ForwardRequest(start_layer=hop.start, end_layer=hop.end, hidden=encode(hidden, wire),
                                    pad_lengths=pads, token=make_token(swarm.identity, hop.peer.peer_id, "forward"))
        try:
            try:
                response = await swarm.stub(hop.peer).Forward(request, timeout=config.step_timeout_s)
                output = forward_answer(response, batch=hidden.shape[0], width=swarm.hidden_size,
                                        positions=hidden.shape[1])
            except BadAnswerError as error:
                raise HopFailure(hop, str(error)) from error
            except Exception as error:
                failure = classify(hop, error, config.step_timeout_s)
                if failure is error:
                    raise
                raise failure from error
        except HopFailure as failure:
            budget.spend(failure)
            if failure.leaving:
                standing.mark_leaving(hop.peer.peer_id)
            else:
                standing.ban(hop.peer.peer_id)
            logger.warning("forward through %s failed (%s); rerouting", hop.peer.peer_id, failure.reason)
            fresh = True
            continue
        hidden, position = output, hop.end
        used.append(f"{hop.peer.peer_id}[{hop.start}:{hop.end}]")
    return hidden, used
