"""`brigade serve`: the OpenAI-compatible API and the chat page for a model served by the swarm.

With ``--initial-peers`` it joins that swarm. Without, it starts a local one (a bootstrap node
and peers on 127.0.0.1, as ``brigade demo`` does) of MODEL, by default the embedded tiny model,
and stops it on exit, so ``brigade serve`` alone gives a working API and chat page.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from contextlib import ExitStack
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

READY_MARK = "BRIGADE_API_READY"


def serve(
    model: Annotated[str | None, typer.Argument(
        help="Checkpoint folder or Hugging Face repo id (default: the embedded tiny model).")] = None,
    initial_peers: Annotated[list[str] | None, typer.Option(
        "--initial-peers", help="DHT multiaddr(s) of the swarm; none: start a local swarm of MODEL.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="BRIGADE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/*.")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model id clients use (default: the model's name in the DHT).")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="Name in the DHT (default: repo id or folder name).")] = None,
    local_peers: Annotated[int, typer.Option(help="Peers of the local swarm, when no --initial-peers.")] = 3,
    max_concurrent: Annotated[int, typer.Option(help="Requests generating at once.")] = 32,
    max_queued: Annotated[int, typer.Option(help="Requests waiting for a turn; more get 503.")] = 256,
    queue_timeout: Annotated[float, typer.Option(help="Seconds a request may wait for a turn.")] = 60.0,
    request_timeout: Annotated[float, typer.Option(help="Seconds one generation may take.")] = 600.0,
) -> None:
    """Serve MODEL over OpenAI's HTTP API (/v1/models, /v1/completions, /v1/chat/completions) and a chat page at /."""
    from brigade.client.api.config import ServeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServeConfig(
        host=host, port=port, api_key=api_key, served_model_name=served_model_name, max_active=max_concurrent,
        max_queued=max_queued, queue_timeout_s=queue_timeout, request_timeout_s=request_timeout,
    )
    run_server(config, model, list(initial_peers or []), model_name=model_name, local_peers=local_peers)


def run_server(config: Any, model: str | None, initial_peers: list[str], *, model_name: str | None = None,
               local_peers: int = 3) -> None:
    """Joins (or starts) the swarm, serves until SIGINT / SIGTERM, then stops everything it started."""
    import uvicorn
    from transformers import AutoTokenizer

    from brigade.client import DistributedModelForCausalLM
    from brigade.client.api.app import create_app
    from brigade.client.api.service import ApiService
    from brigade.kernels.checkpoint import resolve_config_folder
    from brigade.kernels.default_model import DEFAULT_MODEL_DIR

    # Until uvicorn takes the signals over, SIGTERM unwinds like Ctrl-C so the local swarm is stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    model_path = model or str(DEFAULT_MODEL_DIR)
    if not config.api_key and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --api-key: anyone who can reach it can use the swarm", config.host)
    with ExitStack() as stack:
        listener = _listen(config.host, config.port)  # a taken port fails now, not after minutes of loading
        stack.callback(listener.close)
        local_pids: list[int] = []
        if not initial_peers:
            initial_peers, local_pids = _start_local_swarm(stack, model_path, local_peers)
        options = {"model_name": model_name} if model_name else {}
        distributed = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers, **options)
        stack.callback(distributed.close)
        tokenizer = AutoTokenizer.from_pretrained(resolve_config_folder(model_path))
        service = ApiService(distributed, tokenizer, config)
        bound_host, bound_port = listener.getsockname()[:2]
        url = f"http://{bound_host}:{bound_port}" if ":" not in bound_host else f"http://[{bound_host}]:{bound_port}"
        ready = {"url": url, "model": service.model_id, "initial_peers": initial_peers, "local_swarm_pids": local_pids}
        uvicorn_config = uvicorn.Config(create_app(service), log_level="info", access_log=False,
                                        timeout_graceful_shutdown=int(config.graceful_shutdown_s))
        _make_server(uvicorn_config, ready).run(sockets=[listener])


def _make_server(config: Any, ready: dict[str, Any]) -> Any:
    """uvicorn's server, printing a ready line (for people and test fixtures) once it accepts requests."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(f"OpenAI-compatible API at {ready['url']}/v1 (model '{ready['model']}'), "
                      f"chat page at {ready['url']}/", flush=True)
                print(f"{READY_MARK} {json.dumps(ready)}", flush=True)

    return Server(config)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
        listener.set_inheritable(False)
    except OSError:
        listener.close()
        raise
    return listener


def _start_local_swarm(stack: ExitStack, model: str, peers: int) -> tuple[list[str], list[int]]:
    from brigade.demo import split_layers
    from brigade.deploy.launcher import LocalSwarm
    from brigade.kernels.loading import load_config

    spans = split_layers(load_config(model).num_hidden_layers, max(1, peers))
    swarm = stack.enter_context(LocalSwarm())
    logger.info("no --initial-peers: starting a local swarm of %s (%d peers, logs in %s)", model, len(spans),
                swarm.log_dir)
    swarm.start_bootstrap()
    launched = [swarm.add_peer(model, span, extra_args=["--drain-grace", "2"], wait=False) for span in spans]
    for span, peer in zip(spans, launched, strict=True):
        info = swarm.wait_ready(peer)
        logger.info("peer %s serves layers %d:%d at %s", info["peer_id"], span[0], span[1], info["address"])
    pids = [peer.process.pid for peer in [*swarm.peers, *([swarm.bootstrap] if swarm.bootstrap else [])]]
    return list(swarm.initial_peers), pids


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
