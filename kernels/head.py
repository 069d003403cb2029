"""What the client holds of a model: token embeddings, the final norm and the LM head.

Families differ at both ends (``ModelArgs.head()``): Gemma scales embeddings by sqrt(hidden) and
Gemma 2 soft-caps the final logits; Falcon's final norm is a LayerNorm with a bias and its tensors
have other names; many small models tie the LM head to the embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from brigade.kernels.families import model_args


class ClientHead(nn.Module):
    """Both ends of the model that a client computes itself, on either side of the swarm."""

    def __init__(self, config: Any):
        super().__init__()
        self.args = model_args(config)
        self.spec = self.args.head()
        self.embed_tokens = nn.Embedding(self.args.vocab_size, self.args.hidden_size)
        self.norm = self.spec.make_norm()
        if self.spec.embed_norm is not None:  # BLOOM: the same kind of norm as the final one
            self.embed_norm = self.spec.make_norm()
        self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)

    def checkpoint_names(self) -> dict[str, str]:
        """Checkpoint tensor name -> this module's state-dict key, LM head included (tied or not)."""
        names = {self.spec.embed: "embed_tokens.weight", self.spec.lm_head: "lm_head.weight"}
        names.update({f"{self.spec.norm}.{key}": f"norm.{key}" for key in self.norm.state_dict()})
        if self.spec.embed_norm is not None:
            names.update({f"{self.spec.embed_norm}.{key}": f"embed_norm.{key}" for key in self.embed_norm.state_dict()})
        return names

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [B, T] -> [B, T, H]
        if self.spec.embed_scale is not None:  # rounded to the compute dtype first, as the reference does
            hidden = hidden * torch.tensor(self.spec.embed_scale, dtype=hidden.dtype)
        if self.spec.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))  # [B, T, H] -> [B, T, V]
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
