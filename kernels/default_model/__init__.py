"""Tiny stdlib-trained Llama shipped in the package so the demo swarm runs with no downloads."""

from pathlib import Path

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "brigade-tiny-stdlib"
DEFAULT_MODEL_NAME = "brigade-tiny-stdlib"

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_MODEL_NAME"]
