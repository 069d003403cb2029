"""`brigade serve` against a real swarm on loopback, driven by the official ``openai`` client.

Bootstrap node, two peers and the API server are separate processes; the checkpoint and its
tokenizer (with a chat template) are built locally by the fixtures. Greedy answers must equal
local transformers' on the same checkpoint and chat template, streamed or not.
"""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import pytest
import torch
from brigade_api_testkit import API_KEY, ApiServer, ChatModel
from brigade_peer_client import peer_channel
from transformers import AutoModelForCausalLM

from brigade.protocol import brigade_pb2 as pb
from brigade.protocol import brigade_pb2_grpc as pb_grpc

NEW_TOKENS = 12
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


@pytest.fixture(scope="module")
def client(api_server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(chat_model: ChatModel) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(chat_model.checkpoint, dtype=torch.float32).eval()


def local_greedy(reference: AutoModelForCausalLM, tokenizer, ids: list[int], new_tokens: int) -> str:
    """What plain transformers writes after ``ids`` (greedy; stops at EOS like the server)."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def open_sessions(server: ApiServer) -> list[int]:
    counts = []
    for info in server.peers:
        with peer_channel(info) as channel:
            counts.append(pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=5).open_sessions)
    return counts


def wait_sessions_closed(server: ApiServer, timeout_s: float = 5.0) -> float:
    """Seconds until no peer holds a session (fails the test past ``timeout_s``)."""
    began = time.monotonic()
    while sum(open_sessions(server)) > 0:
        assert time.monotonic() - began < timeout_s, f"sessions still open on the peers: {open_sessions(server)}"
        time.sleep(0.02)
    return time.monotonic() - began


def test_lists_the_served_model(client: openai.OpenAI, api_server: ApiServer) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny-chat-llama"] == [api_server.model_id]
    assert client.models.retrieve("tiny-chat-llama").id == "tiny-chat-llama"


def test_completion_streamed_equals_plain_equals_transformers(
    client: openai.OpenAI, chat_model: ChatModel, reference: AutoModelForCausalLM
) -> None:
    prompt = "def dedent(text):"
    ids = chat_model.tokenizer(prompt).input_ids
    expected = local_greedy(reference, chat_model.tokenizer, ids, NEW_TOKENS)
    assert len(expected) >= 4, "the reference must write something for this test to mean anything"

    plain = client.completions.create(model="tiny-chat-llama", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.object == "text_completion" and plain.choices[0].finish_reason in {"stop", "length"}
    assert plain.usage.prompt_tokens == len(ids)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.completions.create(model="tiny-chat-llama", prompt=prompt, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True))
    assert len(chunks) > 2, "a streamed answer comes in pieces"
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_completion_streamed_equals_plain_equals_transformers(
    client: openai.OpenAI, chat_model: ChatModel, reference: AutoModelForCausalLM
) -> None:
    tokenizer = chat_model.tokenizer
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    expected = local_greedy(reference, tokenizer, ids, NEW_TOKENS)
    assert len(expected) >= 4

    plain = client.chat.completions.create(model="tiny-chat-llama", messages=CHAT, max_tokens=NEW_TOKENS,
                                           temperature=0)
    assert plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected
    assert plain.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model="tiny-chat-llama", messages=CHAT, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stop_strings_n_and_seed(client: openai.OpenAI, chat_model: ChatModel,
                                 reference: AutoModelForCausalLM) -> None:
    prompt = "import json\n"
    ids = chat_model.tokenizer(prompt).input_ids
    full = local_greedy(reference, chat_model.tokenizer, ids, NEW_TOKENS)
    stop = next(full[i : i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    expected = full[: full.index(stop)]
    plain = client.completions.create(model="tiny-chat-llama", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                      stop=[stop, "never-seen"])
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(model="tiny-chat-llama", prompt=prompt, max_tokens=NEW_TOKENS,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected

    # n choices come from one request; a seed makes sampling repeatable.
    options = dict(model="tiny-chat-llama", prompt=prompt, max_tokens=6, temperature=1.0, n=3, seed=1234,
                   extra_body={"ignore_eos": True})
    first, second = client.completions.create(**options), client.completions.create(**options)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1, "choices are sampled independently"
    assert first.usage.completion_tokens == 18 and first.usage.prompt_tokens == len(ids)


def test_eight_concurrent_streams(api_server: ApiServer) -> None:
    """8 streamed requests at once all complete, overlap in time, and take much less than 8 one by one."""
    client = openai.AsyncOpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    prompts = [f"def function_{index}(value):" for index in range(8)]

    async def one(prompt: str) -> tuple[str, float, float]:  # text, first token at, finished at
        first = None
        text = ""
        stream = await client.completions.create(model="tiny-chat-llama", prompt=prompt, max_tokens=24,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            first = first or time.monotonic()
            text += chunk.choices[0].text
        return text, first, time.monotonic()

    async def run() -> tuple[list[str], float, list[str], float, list[tuple[str, float, float]]]:
        began = time.monotonic()
        sequential = [(await one(prompt))[0] for prompt in prompts]
        sequential_s = time.monotonic() - began
        began = time.monotonic()
        results = await asyncio.gather(*(one(prompt) for prompt in prompts))
        concurrent_s = time.monotonic() - began
        return sequential, sequential_s, [r[0] for r in results], concurrent_s, results

    sequential, sequential_s, concurrent, concurrent_s, results = asyncio.run(run())
    assert concurrent == sequential, "concurrent requests must not change each other's tokens"
    print(f"\n8 streams one by one: {sequential_s:.2f} s; all at once: {concurrent_s:.2f} s "
          f"({sequential_s / concurrent_s:.1f}x faster)")
    # Far below 8 single requests (the one-by-one time). On 2 shared cores the peers' CPU is the limit
    # (0.6x to 0.65x measured here); a global lock around generation would give about 1.0x.
    assert concurrent_s < 0.8 * sequential_s
    # They ran at the same time: every stream had its first token before any stream had finished.
    assert max(first for _, first, _ in results) < min(finished for _, _, finished in results)
    wait_sessions_closed(api_server)


def test_disconnecting_clients_free_their_sessions(client: openai.OpenAI, api_server: ApiServer) -> None:
    assert open_sessions(api_server) == [0, 0]
    # A streamed request: read a few chunks, then close the connection.
    stream = client.completions.create(model="tiny-chat-llama", prompt="class JSONDecoder", max_tokens=400,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert open_sessions(api_server) == [1, 1], "the generation holds one session per peer"
    stream.close()
    freed_s = wait_sessions_closed(api_server, timeout_s=3.0)
    print(f"\nstream closed by the client: sessions freed on the peers after {1000 * freed_s:.0f} ms")

    # A plain request whose client gives up waiting: its generation is cancelled as well.
    body = {"model": "tiny-chat-llama", "prompt": "class JSONDecoder", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(api_server.url + "/v1/completions", json=body, timeout=1.0,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    freed_s = wait_sessions_closed(api_server, timeout_s=3.0)
    print(f"plain request abandoned: sessions freed after {1000 * freed_s:.0f} ms")


def test_bad_input_gets_openai_errors_and_the_service_keeps_serving(
    client: openai.OpenAI, api_server: ApiServer
) -> None:
    def error_of(call, status: int) -> dict:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status, caught.value
        body = caught.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["message"], body
        return body

    complete = client.completions.create
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt="x", max_tokens="5"), 400)
    assert (body["param"], body["code"]) == ("max_tokens", "invalid_type")
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt="x", temperature="hot"), 400)
    assert body["param"] == "temperature"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt={"text": "x"}), 400)
    assert body["param"] == "prompt"
    body = error_of(lambda: client.chat.completions.create(model="tiny-chat-llama", messages="hello"), 400)
    assert body["param"] == "messages"
    body = error_of(lambda: client.chat.completions.create(
        model="tiny-chat-llama", messages=[{"role": "wizard", "content": "x"}]), 400)
    assert body["param"] == "messages[0].role"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt="x", max_tokens=-1), 400)
    assert body["param"] == "max_tokens"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt="x", n=1000), 400)
    assert body["param"] == "n"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt="x", presence_penalty=0.5), 400)
    assert body["code"] == "unsupported_parameter"
    body = error_of(lambda: complete(model="gpt-4o", prompt="x"), 404)
    assert (body["param"], body["code"]) == ("model", "model_not_found")
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt=[5] * 600), 400)
    assert body["code"] == "context_length_exceeded"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt=[5] * 500, max_tokens=100), 400)
    assert body["code"] == "context_length_exceeded"
    body = error_of(lambda: complete(model="tiny-chat-llama", prompt=[10_000]), 400)
    assert body["param"] == "prompt"

    for key in ("wrong-key", ""):
        keyless = openai.OpenAI(base_url=api_server.url + "/v1", api_key=key or "unused", max_retries=0)
        if not key:
            keyless = keyless.with_options(default_headers={"Authorization": ""})
        body = error_of(lambda client=keyless: client.models.list(), 401)
        assert body["code"] == "invalid_api_key"

    raw = httpx.post(api_server.url + "/v1/completions", content=b'{"prompt": "x",',
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    raw = httpx.post(api_server.url + "/v1/completions", content=b"x" * (5 * 1024 * 1024),
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 413 and raw.json()["error"]["code"] == "request_too_large"

    # Unknown fields are ignored, and the service still answers.
    ok = complete(model="tiny-chat-llama", prompt="x", max_tokens=2, temperature=0,
                  extra_body={"mirostat": 2, "frobnicate": {"deep": [1]}})
    assert ok.usage.completion_tokens >= 1
    assert httpx.get(api_server.url + "/health").json()["status"] == "ok"
    assert api_server.process.poll() is None
