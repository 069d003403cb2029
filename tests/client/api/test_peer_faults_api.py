"""`brigade serve` answers 200 with transformers' text when a peer refuses every step as "your request is wrong".

Before the error taxonomy, a peer answering INVALID_ARGUMENT ended the generation and the API
answered 400: any peer could fail any user's request. Now its refusal bans it and the request
goes around it.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch
from brigade_api_testkit import API_KEY, ChatModel, start_api_server, stop_api_server
from brigade_evil_peer import evil_entry
from brigade_testkit import FAST_PEER_ARGS, PEER_THREADS
from transformers import AutoModelForCausalLM

from brigade.deploy.launcher import LocalSwarm

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def server_url(chat_model: ChatModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("faulty-api")
    with LocalSwarm(folder / "swarm", peer_threads=PEER_THREADS) as swarm:
        swarm.start_bootstrap()
        peers = [
            swarm.add_peer(str(chat_model.checkpoint), (0, 3), wait=False, entry=evil_entry("refuse:invalid"),
                           extra_args=[*FAST_PEER_ARGS, "--throughput", "5000"]),
            swarm.add_peer(str(chat_model.checkpoint), (0, 3), wait=False,
                           extra_args=[*FAST_PEER_ARGS, "--throughput", "100"]),
            swarm.add_peer(str(chat_model.checkpoint), (3, 6), wait=False, extra_args=FAST_PEER_ARGS),
        ]
        for peer in peers:
            swarm.wait_ready(peer)
        args = [str(chat_model.checkpoint), "--port", "0", "--api-key", API_KEY]
        for maddr in swarm.initial_peers:
            args += ["--initial-peers", maddr]
        process, ready = start_api_server(args, folder / "serve.log")
        try:
            yield ready["url"]
        finally:
            stop_api_server(process, ready)


def test_a_refusing_peer_gets_a_200_and_the_transformers_text(server_url: str, chat_model: ChatModel) -> None:
    client = openai.OpenAI(base_url=server_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    answer = client.completions.create(model="tiny-chat-llama", prompt="def main():", max_tokens=NEW_TOKENS,
                                       temperature=0)
    reference = AutoModelForCausalLM.from_pretrained(chat_model.checkpoint, dtype=torch.float32).eval()
    ids = chat_model.tokenizer("def main():").input_ids
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert answer.choices[0].text == chat_model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
