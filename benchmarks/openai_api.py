"""Concurrent requests through the swarm: the client library's ``astream`` and the OpenAI API.

    python benchmarks/openai_api.py                 # the embedded tiny model, 2 peers, 8 streams of 32 tokens
    python benchmarks/openai_api.py --model DIR --peers 3 --streams 16 --tokens 64

Starts a local swarm (bootstrap node and peers on 127.0.0.1), then times the same N greedy
generations (different prompts, EOS ignored so each makes exactly ``--tokens`` tokens) one after
another and all at once, first with ``DistributedModelForCausalLM.astream`` in this process,
then through ``brigade serve`` (a separate process) with the official ``openai`` client,
streaming. Prints total seconds, summed tokens/s and the speed-up of running them at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import AutoTokenizer

from brigade.client import DistributedModelForCausalLM
from brigade.demo import split_layers
from brigade.deploy.launcher import LocalSwarm
from brigade.kernels.default_model import DEFAULT_MODEL_DIR
from brigade.kernels.loading import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from brigade_api_testkit import start_api_server, stop_api_server


async def direct_run(model: DistributedModelForCausalLM, prompts: list[torch.Tensor], tokens: int,
                     concurrent: bool) -> tuple[float, list[float]]:
    async def one(ids: torch.Tensor) -> float:
        began = time.perf_counter()
        first = None
        async for _ in model.astream(ids, max_new_tokens=tokens, eos_token_id=[]):
            first = first or time.perf_counter() - began
        return first or 0.0

    began = time.perf_counter()
    if concurrent:
        firsts = await asyncio.gather(*(one(ids) for ids in prompts))
    else:
        firsts = [await one(ids) for ids in prompts]
    return time.perf_counter() - began, list(firsts)


async def api_run(url: str, model_id: str, prompts: list[str], tokens: int,
                  concurrent: bool) -> tuple[float, list[float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(prompt: str) -> float:
        began = time.perf_counter()
        first = None
        stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            first = first or time.perf_counter() - began
        return first or 0.0

    began = time.perf_counter()
    if concurrent:
        firsts = await asyncio.gather(*(one(prompt) for prompt in prompts))
    else:
        firsts = [await one(prompt) for prompt in prompts]
    await client.close()
    return time.perf_counter() - began, list(firsts)


def report(label: str, sequential: tuple[float, list[float]], concurrent: tuple[float, list[float]],
           streams: int, tokens: int) -> None:
    total = streams * tokens
    for mode, (seconds, firsts) in (("one by one", sequential), ("all at once", concurrent)):
        print(f"{label:<22} {mode:<12} {seconds:8.2f} {total / seconds:10.1f} "
              f"{1000 * statistics.median(firsts):12.0f}")
    print(f"{label:<22} {'speed-up':<12} {sequential[0] / concurrent[0]:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [f"def function_{index}(value):" for index in range(args.streams)]
    prompts = [tokenizer(text, return_tensors="pt").input_ids for text in texts]
    spans = split_layers(load_config(args.model).num_hidden_layers, args.peers)
    with tempfile.TemporaryDirectory() as folder, LocalSwarm(Path(folder) / "swarm") as swarm:
        swarm.start_bootstrap()
        for peer in [swarm.add_peer(args.model, span, wait=False) for span in spans]:
            swarm.wait_ready(peer)
        print(f"{args.streams} streams of {args.tokens} greedy tokens, {len(spans)} peers on loopback, "
              f"{os.cpu_count()} cores, torch {torch.__version__}\n")
        print(f"{'':<22} {'':<12} {'seconds':>8} {'tokens/s':>10} {'first token':>12}")
        with DistributedModelForCausalLM.from_pretrained(args.model, swarm.initial_peers) as model:
            asyncio.run(direct_run(model, prompts[:1], 4, False))  # warm up: routes, channels
            sequential = asyncio.run(direct_run(model, prompts, args.tokens, False))
            concurrent = asyncio.run(direct_run(model, prompts, args.tokens, True))
        report("astream (in process)", sequential, concurrent, args.streams, args.tokens)

        server_args = [args.model, "--port", "0"]
        for maddr in swarm.initial_peers:
            server_args += ["--initial-peers", maddr]
        process, ready = start_api_server(server_args, Path(folder) / "serve.log")
        try:
            asyncio.run(api_run(ready["url"], ready["model"], texts[:1], 4, False))
            sequential = asyncio.run(api_run(ready["url"], ready["model"], texts, args.tokens, False))
            concurrent = asyncio.run(api_run(ready["url"], ready["model"], texts, args.tokens, True))
        finally:
            stop_api_server(process, ready)
        report("OpenAI API (streamed)", sequential, concurrent, args.streams, args.tokens)


if __name__ == "__main__":
    main()
