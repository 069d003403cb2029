"""Helpers for the OpenAI API tests: a locally trained chat tokenizer and `brigade serve` processes.

The tokenizer is a byte-level BPE trained here on a few standard library sources, wrapped in
``PreTrainedTokenizerFast`` with a ChatML chat template, and saved next to a tiny random Llama
whose vocabulary matches it: no hub, no download.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

API_KEY = "test-key-1234"
READY_MARK = "BRIGADE_API_READY"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_chat_tokenizer(folder: Path, vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    """A small byte-level BPE with ChatML special tokens, trained on standard library sources."""
    import json as json_module
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [Path(module.__file__).read_text() for module in (textwrap, json_module.decoder, json_module.encoder)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"], model_max_length=512, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


@dataclass
class ChatModel:
    checkpoint: Path
    tokenizer: object


@dataclass
class ApiServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    peers: list[dict[str, object]]  # the peers' ready lines (address, certificate to pin, ...)
    model_id: str

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_api_server(args: list[str], log_path: Path, timeout_s: float = 180.0) -> tuple[subprocess.Popen[bytes], dict]:
    """Starts ``python -m brigade serve ARGS`` and waits for its ready line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "brigade", "serve", *args], stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_MARK + " "):
                return process, json.loads(line[len(READY_MARK) + 1 :])
        if process.poll() is not None:
            raise RuntimeError(f"brigade serve exited early:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    stop_api_server(process, {})
    raise TimeoutError(f"brigade serve was not ready within {timeout_s:.0f} s:\n{log_path.read_text()[-4000:]}")


def stop_api_server(process: subprocess.Popen[bytes], ready: dict) -> list[int]:
    """SIGTERM (what a service manager sends), then SIGKILL; returns the local swarm's processes still
    alive after that (which it then kills), so a test can check the server stopped its own swarm."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    survivors = []
    for pid in ready.get("local_swarm_pids", []):
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            continue
        survivors.append(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors
