"""`brigade peer run`: host a span of a model's layers."""

from __future__ import annotations

from typing import Annotated

import typer

from brigade.peer.config import PeerConfig

app = typer.Typer(help="Run a peer that hosts a span of a model's layers.", no_args_is_help=True)


def parse_layers(text: str) -> tuple[int, int]:
    """``"0:12"`` -> ``(0, 12)``: half-open, like everywhere else in brigade."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError as e:
        raise typer.BadParameter(f"expected START:END such as 0:12, got {text!r}") from e
    if not 0 <= start < end:
        raise typer.BadParameter(f"expected 0 <= START < END, got {text!r}")
    return start, end


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Local checkpoint folder or Hugging Face repo id.")],
    initial_peers: Annotated[list[str], typer.Option("--initial-peers", help="DHT multiaddr(s) to join.")],
    layers: Annotated[str, typer.Option(help="START:END (half-open), or auto: as many as fit, where needed.")] = "auto",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any free port).")] = 0,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    announce_host: Annotated[str | None, typer.Option(help="Address clients dial (default: --host).")] = None,
    announce_port: Annotated[int | None, typer.Option(help="Port clients dial (default: the bound --port).")] = None,
    dht_listen: Annotated[list[str] | None, typer.Option(help="DHT listen multiaddr(s).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    quant: Annotated[str, typer.Option(help="Quantize linear weights: none | int8 | nf4.")] = "none",
    max_memory: Annotated[str | None, typer.Option(help="Budget for weights + KV cache, e.g. 6GiB.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    model_name: Annotated[str | None, typer.Option(help="Name in the DHT (default: repo id or folder name).")] = None,
    identity: Annotated[str | None, typer.Option(help="Ed25519 key file; created on first run.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the checkpoint.")] = None,
    cache_tokens: Annotated[int | None, typer.Option(help="KV cache pool size in positions (default: plan).")] = None,
    session_idle_timeout: Annotated[float, typer.Option(help="Seconds before an idle session is freed.")] = 300.0,
    num_threads: Annotated[int | None, typer.Option(help="torch threads for compute.")] = None,
    announce_period: Annotated[float, typer.Option(help="Seconds between DHT record refreshes.")] = 10.0,
    record_ttl: Annotated[float, typer.Option(help="Seconds a record lives without refresh.")] = 20.0,
    drain_grace: Annotated[float, typer.Option(help="Seconds open sessions may finish on SIGTERM.")] = 20.0,
    insecure: Annotated[bool, typer.Option(help="Plain-text gRPC, no client tokens: private tests only.")] = False,
    max_sessions_per_client: Annotated[int, typer.Option(help="Open sessions one client may hold.")] = 64,
    client_cache_share: Annotated[float, typer.Option(help="Share of the KV cache one client may hold.")] = 0.25,
    allow_client: Annotated[list[str] | None, typer.Option(help="Serve only these client ids (repeat).")] = None,
    block_client: Annotated[list[str] | None, typer.Option(help="Refuse these client ids (repeat).")] = None,
    allow_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: store, read, forward to and accept pushes from only these "
             "peers (a private swarm; give every node the same file).")] = None,
    block_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: never store their records, route to them or accept their pushes.")]
    = None,
    max_session_length: Annotated[int, typer.Option(
        help="Positions per sequence a session may ask for (at most the model's max_position_embeddings).")] = 8192,
    max_batch_tokens: Annotated[int, typer.Option(help="Positions one batched pass may compute.")] = 2048,
    prefill_chunk_tokens: Annotated[int, typer.Option(help="Prefill chunk size (pipelining, fairness).")] = 512,
    batch_window_ms: Annotated[float, typer.Option(help="Cap (ms) on waiting for busy sessions' steps.")] = 10.0,
    num_layers: Annotated[int | None, typer.Option(
        help="With --layers auto: how many layers to host (default: as many as fit).")] = None,
    throughput: Annotated[str, typer.Option(
        help="Tokens/s per layer to announce: auto (cached, else measured), eval (measure now), "
             "or DECODE[:PREFILL] fixed.")] = "auto",
    throughput_cache: Annotated[str | None, typer.Option(
        help="File of past throughput measurements (default: ~/.cache/brigade/throughput.json; '' = none).")] = None,
    ping_period: Annotated[float, typer.Option(
        help="Seconds between round-trip measurements to the next layers' peers (0 = never).")] = 30.0,
    rebalance_period: Annotated[float, typer.Option(
        help="Mean seconds between re-checks of where this peer is most useful (0 = never; auto layers only).")]
    = 120.0,
    rebalance_gain: Annotated[float, typer.Option(
        help="Move only when the swarm's weakest point rises by at least this fraction.")] = 0.02,
    move_drain: Annotated[float, typer.Option(
        help="Seconds a moving peer lets open sessions leave before it closes them.")] = 30.0,
    reachability: Annotated[str, typer.Option(
        help="auto: ask other peers to dial back and serve through a relay if they cannot; direct: assume "
             "reachable (no check); relayed: always serve through a relay.")] = "auto",
    relay: Annotated[bool, typer.Option(
        "--relay", help="Relay for peers that cannot accept connections (only while this peer is reachable).")]
    = False,
    relay_port: Annotated[int, typer.Option(help="TCP port relayed peers' clients connect to (0 = any).")] = 0,
    relay_announce_port: Annotated[int | None, typer.Option(
        help="Relay port clients dial (default: the bound --relay-port).")] = None,
    relay_max_peers: Annotated[int, typer.Option(help="Peers relayed here at once.")] = 16,
    relay_max_connections: Annotated[int, typer.Option(help="Client connections relayed at once.")] = 128,
    relay_max_bytes: Annotated[str, typer.Option(
        help="Bytes relayed per relayed peer per hour, e.g. 4GiB (0 = no cap).")] = "4GiB",
    relayed_backend: Annotated[str | None, typer.Option(
        help="host:port a relayed peer hands its relayed connections to (default: its own gRPC port; "
             "testbeds: a delay proxy).")] = None,
) -> None:
    """Host layers START:END of MODEL, serve them over gRPC and announce them on the DHT."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if quant not in ("none", "int8", "nf4"):
        raise typer.BadParameter(f"--quant must be none, int8 or nf4, got {quant!r}")
    start, end = (None, None) if layers == "auto" else parse_layers(layers)
    from brigade.peer.throughput import parse_throughput_option

    try:
        parse_throughput_option(throughput)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if num_layers is not None and num_layers < 1:
        raise typer.BadParameter(f"--num-layers must be at least 1, got {num_layers}")
    if announce_port is not None and not 0 < announce_port < 65536:
        raise typer.BadParameter(f"--announce-port must be a port number, got {announce_port}")
    if not 0 <= rebalance_gain < 10:
        raise typer.BadParameter(f"--rebalance-gain must be in [0, 10), got {rebalance_gain}")
    from brigade.kernels.memory import parse_bytes
    from brigade.routing.peer_filter import PeerFilter

    try:
        peer_filter = PeerFilter.from_files(allow_peers, block_peers)
        clients = PeerFilter.of(allow_client, block_client or ())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e

    try:
        max_memory_bytes = parse_bytes(max_memory) if max_memory else None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if reachability not in ("auto", "direct", "relayed"):
        raise typer.BadParameter(f"--reachability must be auto, direct or relayed, got {reachability!r}")
    for name, value in (("--relay-port", relay_port), ("--relay-announce-port", relay_announce_port or 1)):
        if not 0 <= value < 65536:
            raise typer.BadParameter(f"{name} must be a port number, got {value}")
    if relay_max_peers < 1 or relay_max_connections < 1:
        raise typer.BadParameter("--relay-max-peers and --relay-max-connections must be at least 1")
    try:
        relay_max_bytes_per_hour = parse_bytes(relay_max_bytes)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--relay-max-bytes") from e
    if max_session_length < 1:
        raise typer.BadParameter(f"--max-session-length must be at least 1, got {max_session_length}")
    from brigade.kernels.checkpoint import CheckpointError, CheckpointMismatchError
    from brigade.kernels.loading import check_checkpoint, load_config
    from brigade.kernels.span import UnsupportedModelError

    # Before anything starts: an unsupported family or option, or weights that do not match their
    # config, are named here in one line, not deep in loading after the peer joined the swarm.
    try:
        from brigade.kernels.families import model_args

        model_config = load_config(model, revision)
        model_args(model_config)
        check_checkpoint(model, model_config)
    except (UnsupportedModelError, CheckpointError, CheckpointMismatchError, OSError, ValueError) as e:
        # One plain line (the form start-up errors take too), greppable in a log: no usage box.
        typer.echo(f"brigade peer: cannot serve {model}: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(2) from None
    config = PeerConfig(
        model=model,
        start_layer=start,
        end_layer=end,
        initial_peers=tuple(initial_peers),
        model_name=model_name,
        host=host,
        port=port,
        announce_host=announce_host,
        announce_port=announce_port,
        dht_listen=tuple(dht_listen) if dht_listen else PeerConfig.dht_listen,
        identity_path=identity,
        dtype=dtype,
        quantization=quant,
        max_memory_bytes=max_memory_bytes,
        device=device,
        revision=revision,
        num_threads=num_threads,
        cache_tokens=cache_tokens,
        session_idle_timeout_s=session_idle_timeout,
        announce_period_s=announce_period,
        record_ttl_s=record_ttl,
        drain_grace_s=drain_grace,
        insecure=insecure,
        max_sessions_per_client=max_sessions_per_client,
        client_cache_share=client_cache_share,
        allowed_clients=clients.allow,
        blocked_clients=clients.block,
        allowed_peers=peer_filter.allow,
        blocked_peers=peer_filter.block,
        max_session_length=max_session_length,
        max_batch_tokens=max_batch_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
        batch_window_ms=batch_window_ms,
        span_length=num_layers,
        throughput=throughput,
        throughput_cache=throughput_cache,
        ping_period_s=max(0.0, ping_period),
        rebalance_period_s=max(0.0, rebalance_period),
        rebalance_min_gain=rebalance_gain,
        move_drain_s=max(0.0, move_drain),
        reachability=reachability,
        relay=relay,
        relay_port=relay_port,
        relay_announce_port=relay_announce_port,
        relay_max_peers=relay_max_peers,
        relay_max_connections=relay_max_connections,
        relay_max_connections_per_peer=min(PeerConfig.relay_max_connections_per_peer, relay_max_connections),
        relay_max_bytes_per_hour=relay_max_bytes_per_hour,
        relayed_backend=relayed_backend,
    )
    from brigade.peer.server import main

    main(config)
