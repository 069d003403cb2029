"""Train brigade's embedded default model: a tiny Llama that writes Python-like text.

The README demo has to run a real swarm on a real checkpoint without downloading anything, so
the package ships a few megabytes of weights trained on text that every machine already has: the
Python standard library's own ``*.py`` sources. The result is only good for showing that tokens
flow through the swarm and come back as recognizable Python; it is not useful for anything else.

Run (the defaults reproduce the shipped checkpoint, up to wall-clock nondeterminism)::

    python -m brigade.kernels.default_model.train [--out DIR] [--minutes M] [--threads N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from brigade.kernels.default_model.corpus import (
    MAX_FILE_BYTES,
    SPECIAL_TOKENS,
    build_stream,
    collect_stdlib_sources,
    train_tokenizer,
    wrap_tokenizer,
)

MODEL_NAME = "brigade-tiny-stdlib"

DEFAULT_OUT = Path(__file__).resolve().parent / "brigade-tiny-stdlib"
DEFAULT_MINUTES = 12.0
DEFAULT_SEED = 1234

# Files a previous run of this script leaves in the output folder; anything else there means the
# folder is not ours and we refuse to replace it.
_OWN_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "README.md",
        "training_log.json",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the run, kept in one place so the model card can quote it."""

    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512  # ~2.7x hidden, as in Llama
    num_layers: int = 6  # >= 6 so three demo peers each serve two blocks
    num_heads: int = 8
    num_kv_heads: int = 4  # grouped-query attention, so the demo exercises the GQA path
    max_positions: int = 512
    context: int = 256
    batch_size: int = 8  # on one CPU core, more small steps beat fewer big ones
    peak_lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    holdout_files: int = 40  # last files (in sorted order) kept out of training for a val loss
    eval_batches: int = 8


def batches(stream, context: int, batch_size: int, bos_id: int, generator) -> Iterator:
    """Yield endless ``(batch_size, context)`` windows at random offsets, each starting with ``<s>``.

    The tokenizer puts ``<s>`` before every prompt, and a prompt is usually a fragment ("def ",
    "import os\n"), not the start of a file. Starting every window with ``<s>`` followed by
    mid-file text makes exactly that situation common in training; without it ``<s>`` is only
    ever followed by a file's first line and short prompts land far from anything seen.
    """
    import torch

    high = stream.numel() - (context - 1)
    bos = torch.tensor([bos_id], dtype=stream.dtype)
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield torch.stack([torch.cat([bos, stream[s : s + context - 1]]) for s in starts.tolist()]).long()


def lr_at(step: int, time_frac: float, cfg: TrainConfig) -> float:
    """Linear warmup by step, then cosine decay by *elapsed wall-clock fraction*.

    The run is bounded by time, not steps, so the schedule has to be driven by time to reach its
    floor exactly when the budget runs out, whatever the machine's speed.
    """
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    frac = min(max(time_frac, 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.peak_lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def evaluate(model, stream, cfg: TrainConfig, seed: int) -> float:
    """Mean loss on fixed windows of held-out files (same windows every call)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    it = batches(stream, cfg.context, cfg.batch_size, model.config.bos_token_id, gen)
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x = next(it)
            losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def _prepare_out_dir(out: Path) -> Path:
    """Return a fresh staging folder next to ``out``; refuse to later replace a folder that isn't ours."""
    if out.exists():
        foreign = [p.name for p in out.iterdir() if p.name not in _OWN_FILES]
        if foreign:
            raise SystemExit(f"{out} holds files this script did not write ({foreign}); pick another --out")
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _make_tokenizer_config_portable(path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``.

    transformers 5 writes ``TokenizersBackend``, a class 4.x (still allowed by pyproject) lacks;
    ``PreTrainedTokenizerFast`` exists in both and loads the same ``tokenizer.json``.
    """
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_card(cfg: TrainConfig, stats: dict, command: str) -> str:
    """A short README for the checkpoint folder: what it is, how it was made, what not to expect."""
    return f"""# {MODEL_NAME}

A tiny Llama-architecture causal language model that ships inside the `brigade` package so the
README demo can start a local swarm and generate text with no downloads.

It was trained from scratch on the `*.py` files of the Python {stats["python_version"]} standard library
(`sysconfig.get_paths()["stdlib"]`, excluding `site-packages`, test directories, the `encodings/`
codec tables and files over {MAX_FILE_BYTES // 1000} kB). It writes
Python-like text and **is not useful for anything else**.
Greedy decoding soon repeats itself (a model this small and this briefly trained loops);
sampling, e.g. temperature 0.7 with top-k 40, reads better.

## Shape

| | |
|---|---|
| vocab (byte-level BPE, `<s>`=0, `</s>`=1, `<pad>`=2) | {stats["vocab_size"]} |
| hidden / intermediate | {cfg.hidden_size} / {cfg.intermediate_size} |
| layers | {cfg.num_layers} |
| attention heads / kv heads (GQA) | {cfg.num_heads} / {cfg.num_kv_heads} |
| max positions / training context | {cfg.max_positions} / {cfg.context} |
| parameters | {stats["parameters"]:,} (tied embeddings), stored in bfloat16 |

## Training

- Corpus: {stats["files"]} files, {stats["train_tokens"]:,} training tokens, each file wrapped as
  `<s> … </s>`; the last {cfg.holdout_files} files (sorted order) held out for validation.
  Training windows start at random offsets and each begins with `<s>`, as a prompt does.
- AdamW (betas 0.9/0.95, weight decay {cfg.weight_decay}), peak lr {cfg.peak_lr}, {cfg.warmup_steps} warmup
  steps, cosine decay over the wall-clock budget to {cfg.min_lr_ratio}x,
  batch {cfg.batch_size} x {cfg.context} tokens, bf16 autocast with fp32 master weights,
  grad clip {cfg.grad_clip}, seed {stats["seed"]}, {stats["threads"]} CPU thread(s).
- Wall-clock budget {stats["minutes"]} min: {stats["steps"]} steps, {stats["tokens_seen"]:,} tokens seen,
  {stats["train_seconds"]:.0f} s of training.
- Final training loss (mean of the last 20 steps): {stats["final_train_loss"]:.3f};
  held-out loss: {stats["final_val_loss"]:.3f}.

Command:

```
{command}
```

The budget is wall-clock time, so the number of steps (and the exact weights) depends on the
machine's speed; the seed fixes the data, initialisation and batch order, not the result bit for bit.
"""


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train tokenizer and model, and write the checkpoint folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="wall-clock training budget")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and tokenizers")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    # Must be set before tokenizers/torch spin up their thread pools.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import platform

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = TrainConfig()
    out: Path = args.out.resolve()
    t_start = time.monotonic()

    sources = collect_stdlib_sources()
    texts = [text for _, text in sources]
    train_texts, val_texts = texts[: -cfg.holdout_files], texts[-cfg.holdout_files :]
    print(f"corpus: {len(texts)} files, {sum(map(len, texts)):,} chars", flush=True)

    tok = train_tokenizer(train_texts, cfg.vocab_size)
    hf_tok = wrap_tokenizer(tok, cfg.max_positions)
    train_stream = build_stream(tok, train_texts)
    val_stream = build_stream(tok, val_texts)
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}, train {train_stream.numel():,} tokens, "
        f"val {val_stream.numel():,} tokens ({time.monotonic() - t_start:.0f}s)",
        flush=True,
    )

    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    model_config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model = LlamaForCausalLM(model_config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    # No weight decay on norms (1-D gains); the tied embedding is decayed like any matrix.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    data = batches(train_stream, cfg.context, cfg.batch_size, bos_id, torch.Generator().manual_seed(args.seed))
    budget_s = args.minutes * 60.0
    log: list[dict] = []
    recent: list[float] = []
    step = 0
    t_train = time.monotonic()
    while True:
        elapsed = time.monotonic() - t_train
        if elapsed >= budget_s:
            break
        lr = lr_at(step, elapsed / budget_s, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = next(data)
        # bf16 matmuls (fp32 master weights and optimizer state) are ~20% faster on CPUs with
        # AVX512-BF16/AMX, i.e. more steps in the same budget; the shipped weights are bf16 anyway.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        recent = [*recent[-19:], loss.item()]
        step += 1
        if step % 25 == 0 or step == 1:
            entry = {
                "step": step,
                "seconds": round(time.monotonic() - t_train, 1),
                "loss": round(sum(recent) / len(recent), 4),
                "lr": round(lr, 6),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_seconds = time.monotonic() - t_train
    final_train_loss = sum(recent) / len(recent)
    # Round to bf16 first so the reported loss is that of the weights actually shipped.
    model = model.to(torch.bfloat16).to(torch.float32)
    final_val_loss = evaluate(model, val_stream, cfg, args.seed)
    print(
        f"done: {step} steps in {train_seconds:.0f}s, train loss {final_train_loss:.3f}, val loss {final_val_loss:.3f}",
        flush=True,
    )

    staging = _prepare_out_dir(out)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        do_sample=False,
        max_new_tokens=48,
    )
    model = model.to(torch.bfloat16)
    # safe_serialization is the default (and the only format) in recent transformers; passing it
    # keeps older 4.x releases, which pyproject still allows, from writing a pickle.
    model.save_pretrained(staging, safe_serialization=True)
    hf_tok.save_pretrained(staging)
    _make_tokenizer_config_portable(staging / "tokenizer_config.json")
    stats = {
        "python_version": platform.python_version(),
        "vocab_size": tok.get_vocab_size(),
        "parameters": n_params,
        "files": len(texts),
        "train_tokens": int(train_stream.numel()),
        "seed": args.seed,
        "threads": args.threads,
        "minutes": args.minutes,
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.context,
        "train_seconds": train_seconds,
        "final_train_loss": final_train_loss,
        "final_val_loss": final_val_loss,
    }
    command = (
        f"python -m brigade.kernels.default_model.train --minutes {args.minutes:g} "
        f"--threads {args.threads} --seed {args.seed}"
    )
    (staging / "README.md").write_text(_model_card(cfg, stats, command))
    (staging / "training_log.json").write_text(json.dumps({"stats": stats, "log": log}, indent=1) + "\n")
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; package data must be readable by every user
    unexpected = sorted(p.name for p in staging.iterdir() if p.name not in _OWN_FILES)
    if unexpected:
        raise SystemExit(f"save wrote unexpected files {unexpected}; update _OWN_FILES")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"wrote {out} ({time.monotonic() - t_start:.0f}s total)", flush=True)


if __name__ == "__main__":
    main()
