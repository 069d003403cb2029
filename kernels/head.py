"""What the client holds of a model: token embeddings, the final norm and the LM head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from brigade.kernels.llama import LlamaArgs, RMSNorm


class ClientHead(nn.Module):
    """Both ends of the model that a client computes itself, on either side of the swarm."""

    def __init__(self, config: Any):
        super().__init__()
        self.args = LlamaArgs.from_config(config)
        self.embed_tokens = nn.Embedding(self.args.vocab_size, self.args.hidden_size)
        self.norm = RMSNorm(self.args.hidden_size, self.args.rms_norm_eps)
        self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B, T] -> [B, T, H]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()  # [B, T, H] -> [B, T, V]
