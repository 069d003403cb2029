"""Where a checkpoint's tensors live, and reading only the ones a caller names.

A peer for layers 4:8 of a 70B model must not download or read the other 76 layers: the index
(``model.safetensors.index.json``, or the header of a single file) says which file holds which
tensor, and only those files are fetched and only those tensors read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


class CheckpointError(FileNotFoundError):
    """The checkpoint is missing, not in safetensors format, or lacks a tensor."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are not the ones its config describes (names or shapes)."""


def layer_of(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None for embeddings, norms and heads."""
    match = _LAYER_NAME.match(tensor_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint folder and the map from tensor name to file."""

    folder: Path
    weight_map: dict[str, str]  # tensor name -> file name inside folder

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Checkpoint:
        folder = Path(folder)
        if (folder / INDEX_FILE).exists():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            return cls(folder, dict(weight_map))
        if (folder / SINGLE_FILE).exists():
            with safe_open(folder / SINGLE_FILE, framework="pt") as file:
                return cls(folder, {name: SINGLE_FILE for name in file.keys()})
        raise CheckpointError(
            f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; brigade reads safetensors checkpoints only"
        )

    def names(self, keep: Callable[[str], bool]) -> list[str]:
        return sorted(name for name in self.weight_map if keep(name))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor in a file that is here, from the headers only (nothing is read).

        A peer may hold only the shards of its own layers (the rest of the index names files it
        never fetched): their tensors are simply not in the answer.
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for file_name in sorted(set(self.weight_map.values())):
            path = self.folder / file_name
            if not path.exists():
                continue
            with safe_open(path, framework="pt") as file:
                for name in file.keys():
                    shapes[name] = tuple(file.get_slice(name).get_shape())
        return shapes

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Reads exactly ``names``, opening each file that holds one of them once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.folder}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            with safe_open(self.folder / file_name, framework="pt") as file:
                for name in file_names:
                    tensors[name] = file.get_tensor(name)
        return tensors


def resolve(model: str, keep: Callable[[str], bool], revision: str | None = None) -> Checkpoint:
    """Opens ``model`` as a local folder, or fetches from the Hub only the files that hold kept tensors."""
    if Path(model).is_dir():
        return Checkpoint.open(model)
    from huggingface_hub import hf_hub_download, snapshot_download

    small_files = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json"]
    try:
        index_path = hf_hub_download(model, INDEX_FILE, revision=revision)
    except Exception:
        folder = snapshot_download(model, revision=revision, allow_patterns=[*small_files, SINGLE_FILE])
        return Checkpoint.open(folder)
    weight_map: dict[str, str] = json.loads(Path(index_path).read_text())["weight_map"]
    needed = sorted({file for name, file in weight_map.items() if keep(name)})
    logger.info("fetching %d of %d shards of %s", len(needed), len(set(weight_map.values())), model)
    folder = snapshot_download(model, revision=revision, allow_patterns=[*small_files, INDEX_FILE, *needed])
    return Checkpoint.open(folder)


def resolve_config_folder(model: str, revision: str | None = None) -> str:
    """A folder (local or a Hub snapshot of the small files) holding config and tokenizer."""
    if Path(model).is_dir():
        if not (Path(model) / "config.json").exists():
            raise CheckpointError(f"{model} has no config.json: is it the checkpoint's own folder?")
        return model
    if _looks_like_a_path(model):
        raise CheckpointError(f"no folder {model}: give a checkpoint folder or a Hugging Face repo id (org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.model"]
    return snapshot_download(model, revision=revision, allow_patterns=patterns)


def _looks_like_a_path(model: str) -> bool:
    """A name a user meant as a local path (which is not there), not a Hub repo id such as ``org/name``."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
