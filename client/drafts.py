"""The draft of speculative decoding: a small local causal LM with the model's vocabulary, and its cache.

``DraftRunner`` proposes k tokens after the settled sequence, keeping its own KV cache in step with
what was settled (a rejected draft's positions are dropped before the next round); ``DraftCache``
keeps loaded drafts per model so a draft given by path loads once. The round logic that checks
drafts against the swarm is ``client/speculative.py``.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from brigade.client.decoding import Finisher
from brigade.client.sampling import TokenChooser

logger = logging.getLogger(__name__)

K_MAX = 16  # most drafts per round (also the bound of a fixed ``draft_tokens``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class DraftVocabularyError(ValueError):
    """The draft's token ids are not the model's: its proposals would mean other words."""


# -- the draft model ---------------------------------------------------------------------------------
def load_draft(draft: Any, vocab_size: int, model_folder: str | None) -> Any:
    """The draft as a module in eval mode, its vocabulary checked against the model's.

    ``draft`` is a transformers causal LM, or a folder / repo id for ``AutoModelForCausalLM``.
    """
    if isinstance(draft, str | os.PathLike):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(draft))
    else:
        model = draft
    if not callable(model) or getattr(model, "config", None) is None:
        raise TypeError(f"draft_model must be a transformers causal LM or a path to one, not {type(draft).__name__}")
    check_vocabulary(model, vocab_size, model_folder)
    return model.eval()


def check_vocabulary(draft: Any, vocab_size: int, model_folder: str | None) -> None:
    """The same tokenizer vocabulary where both have a tokenizer; else the same number of token ids.

    Sizes alone would refuse real pairs (families pad their embeddings to different multiples) and
    accept wrong ones (two tokenizers of the same size), so tokenizers decide when they are there.
    """
    ours = _tokenizer_vocab(model_folder)
    theirs = _tokenizer_vocab(getattr(draft, "name_or_path", None) or getattr(draft.config, "_name_or_path", None))
    if ours is not None and theirs is not None:
        if ours != theirs:
            differing = len(set(ours.items()) ^ set(theirs.items()))
            raise DraftVocabularyError(
                f"the draft's tokenizer is not the model's ({len(theirs)} tokens against {len(ours)}, "
                f"{differing} entries differ): use a draft of the same model family and tokenizer")
        return
    size = draft_vocab_size(draft)
    if size != vocab_size:
        raise DraftVocabularyError(
            f"the draft has {size} token ids and the model {vocab_size}: use a draft with the model's vocabulary")


def draft_vocab_size(draft: Any) -> int:
    embeddings = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return int(embeddings.weight.shape[0])
    config = draft.config.get_text_config() if hasattr(draft.config, "get_text_config") else draft.config
    return int(config.vocab_size)


def _tokenizer_vocab(folder: str | os.PathLike | None) -> dict[str, int] | None:
    """A local folder's tokenizer vocabulary; None where there is none (never reaches for the Hub)."""
    if not folder or not Path(folder).is_dir() or not any((Path(folder) / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as error:  # a folder whose tokenizer files transformers cannot read: fall back to sizes
        logger.debug("no usable tokenizer in %s: %s", folder, error)
        return None


class DraftCache:
    """Drafts already loaded or checked, so a second ``generate`` with the same draft costs nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # stream (caller's thread) and astream (head thread) may both ask
        self._by_path: dict[str, Any] = {}  # the last draft loaded from a path (one: drafts are models)
        self._checked: weakref.WeakSet[Any] = weakref.WeakSet()  # draft objects whose vocabulary passed

    def get(self, draft: Any, vocab_size: int, model_folder: str | None) -> Any:
        with self._lock:
            if isinstance(draft, str | os.PathLike):
                key = str(draft)
                if key not in self._by_path:
                    loaded = load_draft(draft, vocab_size, model_folder)
                    self._by_path = {key: loaded}
                return self._by_path[key]
            if draft not in self._checked:
                load_draft(draft, vocab_size, model_folder)
                self._checked.add(draft)
            return draft.eval()


class DraftRunner:
    """One generation's draft: the model, its KV cache, and which tokens that cache holds."""

    def __init__(self, model: Any, pad_lengths: list[int], vocab_size: int):
        self.model = model
        self.pads = torch.tensor(pad_lengths, dtype=torch.long)
        self.vocab_size = vocab_size
        self.cache: Any = None
        self.fed = torch.empty(len(pad_lengths), 0, dtype=torch.long)  # tokens whose keys/values the cache holds
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._cache_argument = cache_argument(model)

    def room(self, length: int) -> int:
        """How many drafts may follow a sequence of ``length`` tokens within the draft's positions."""
        return K_MAX if self.max_positions is None else self.max_positions - length

    @torch.inference_mode()
    def propose(self, sequences: torch.Tensor, k: int, choose: TokenChooser, finisher: Finisher,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` drafts [B, k] after ``sequences`` [B, L], and (sampling only) their distributions [B, k, V].

        Greedy drafts are the draft's argmax; sampled drafts come from the draft's warped
        distribution q, which the acceptance rule needs. Finished rows draft padding, as their
        sequences hold, so the draft's cache stays in step with them.
        """
        self._sync(sequences)
        feed = sequences[:, self.fed.shape[1]:]
        prefix = sequences
        drafts, distributions = [], []
        for _ in range(k):  # the last draft is never fed: the verification decides what follows it
            logits = self._forward(feed)  # [B, V]
            if choose.params.do_sample:
                q = choose.probabilities(prefix, logits)
                token = torch.multinomial(q, num_samples=1, generator=choose.generator).squeeze(1)
                distributions.append(q)
            else:
                token = logits.argmax(dim=-1)
            if finisher.pad is not None:
                token = torch.where(finisher.unfinished, token, torch.full_like(token, finisher.pad))
            drafts.append(token)
            prefix = torch.cat([prefix, token[:, None]], dim=1)
            feed = token[:, None]
        return torch.stack(drafts, dim=1), torch.stack(distributions, dim=1) if distributions else None

    def _sync(self, sequences: torch.Tensor) -> None:
        """Drops cached positions whose token is not the settled one (rejected drafts, padding after EOS)."""
        fed = self.fed.shape[1]
        common = min(fed, sequences.shape[1] - 1)  # at least one settled token is always fed again
        same = (self.fed[:, :common] == sequences[:, :common]).all(dim=0)
        keep = int(same.long().cumprod(dim=0).sum())
        if keep == fed:
            return
        if keep > 0 and self.cache is not None:
            try:
                self.cache.crop(keep - fed)  # negative: how many to drop (transformers 4.56 and 5 both read it so)
                self.fed = self.fed[:, :keep]
                return
            except (AttributeError, RuntimeError, ValueError) as error:  # a cache that cannot roll back (windows)
                logger.debug("draft cache cannot roll back (%s); feeding the sequence again", error)
        self.cache = None
        self.fed = self.fed[:, :0]

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The draft's logits [B, V] for the position after ``tokens`` [B, T], which join its cache."""
        past = self.fed.shape[1]
        total = past + tokens.shape[1]
        mask = (torch.arange(total)[None, :] >= self.pads[:, None]).long()  # [B, total]: left padding masked
        positions = (torch.arange(past, total)[None, :] - self.pads[:, None]).clamp(min=0)  # [B, T]
        device = self.model.device
        out = self.model(input_ids=tokens.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True, logits_to_keep=1,
                         **{self._cache_argument: self.cache})
        self.cache = out[self._cache_argument] if self._cache_argument in out else out.past_key_values
        self.fed = torch.cat([self.fed, tokens], dim=1)
        return _fit_vocab(out.logits[:, -1].float().cpu(), self.vocab_size)


def cache_argument(model: Any) -> str:
    """The name of the forward's KV-cache argument: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The draft's logits over the model's ids (same tokenizer, embeddings padded to another size)."""
    have = logits.shape[-1]
    if have >= vocab_size:
        return logits[:, :vocab_size]
    return torch.cat([logits, logits.new_full((logits.shape[0], vocab_size - have), float("-inf"))], dim=-1)


# -- verification ------------------------------------------------------------------------------------
