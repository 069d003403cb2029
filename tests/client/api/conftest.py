"""One swarm and one `brigade serve` process shared by the OpenAI API tests, built from local files only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from brigade_api_testkit import API_KEY, ApiServer, ChatModel, build_chat_tokenizer, start_api_server, stop_api_server
from brigade_testkit import build_checkpoint, start_swarm

from brigade.deploy.launcher import LocalSwarm


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    """A tiny Llama whose vocabulary is the locally trained tokenizer's; EOS is ChatML's end of turn."""
    folder = tmp_path_factory.mktemp("chat") / "tiny-chat-llama"
    folder.mkdir()
    tokenizer = build_chat_tokenizer(folder)
    build_checkpoint(
        folder, "llama", seed=3, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return ChatModel(folder, tokenizer)


@pytest.fixture(scope="module")
def chat_swarm(chat_model: ChatModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tmp_path_factory.mktemp("chat-swarm"), chat_model.checkpoint, [(0, 3), (3, 6)])
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def api_server(chat_model: ChatModel, chat_swarm: LocalSwarm,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """`brigade serve CHECKPOINT --initial-peers ... --api-key ...` as its own process, on a free port."""
    args = [str(chat_model.checkpoint), "--port", "0", "--api-key", API_KEY, "--queue-timeout", "30"]
    for maddr in chat_swarm.initial_peers:
        args += ["--initial-peers", maddr]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    process, ready = start_api_server(args, log_path)
    server = ApiServer(ready["url"], process, log_path, [dict(peer.info) for peer in chat_swarm.peers],
                       ready["model"])
    yield server
    stop_api_server(process, ready)
