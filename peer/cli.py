"""`brigade peer run`: host a span of a model's layers."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from brigade.peer.config import PeerConfig

app = typer.Typer(help="Run a peer that hosts a span of a model's layers.", no_args_is_help=True)

RELAY_MAX_BYTES = f"{PeerConfig.relay_max_bytes_per_hour / 2**30:g}GiB"  # --relay-max-bytes, as people write it
# Parameters of ``run`` whose config field has another name: the flag is short, the field says its unit.
RENAMED = {
    "quant": "quantization",
    "identity": "identity_path",
    "num_layers": "span_length",
    "session_idle_timeout": "session_idle_timeout_s",
    "announce_period": "announce_period_s",
    "record_ttl": "record_ttl_s",
    "drain_grace": "drain_grace_s",
    "ping_period": "ping_period_s",
    "rebalance_period": "rebalance_period_s",
    "rebalance_gain": "rebalance_min_gain",
    "move_drain": "move_drain_s",
    "step_timeout": "step_timeout_s",
}


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
    port: Annotated[int, typer.Option(help="gRPC port (0 = any free port).")] = PeerConfig.port,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = PeerConfig.host,
    announce_host: Annotated[str | None, typer.Option(help="Address clients dial (default: --host).")] = None,
    announce_port: Annotated[int | None, typer.Option(help="Port clients dial (default: the bound --port).")] = None,
    dht_listen: Annotated[list[str] | None, typer.Option(help="DHT listen multiaddr(s).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = PeerConfig.dtype,
    quant: Annotated[str, typer.Option(help="Quantize linear weights: none | int8 | nf4.")] = PeerConfig.quantization,
    max_memory: Annotated[str | None, typer.Option(help="Budget for weights + KV cache, e.g. 6GiB.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = PeerConfig.device,
    model_name: Annotated[str | None, typer.Option(help="Name in the DHT (default: repo id or folder name).")] = None,
    identity: Annotated[str | None, typer.Option(help="Ed25519 key file; created on first run.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the checkpoint.")] = None,
    cache_tokens: Annotated[int | None, typer.Option(help="KV cache pool size in positions (default: plan).")] = None,
    session_idle_timeout: Annotated[float, typer.Option(
        help="Seconds before an idle session is freed.")] = PeerConfig.session_idle_timeout_s,
    num_threads: Annotated[int | None, typer.Option(help="torch threads for compute.")] = None,
    announce_period: Annotated[float, typer.Option(
        help="Seconds between DHT record refreshes.")] = PeerConfig.announce_period_s,
    record_ttl: Annotated[float, typer.Option(
        help="Seconds a record lives without refresh.")] = PeerConfig.record_ttl_s,
    drain_grace: Annotated[float, typer.Option(
        help="Seconds open sessions may finish on SIGTERM.")] = PeerConfig.drain_grace_s,
    insecure: Annotated[bool, typer.Option(
        help="Plain-text gRPC, no client tokens: private tests only.")] = PeerConfig.insecure,
    private_swarm: Annotated[bool | None, typer.Option(
        "--private-swarm/--public-swarm",
        help="Dial private, loopback and link-local addresses that records and requests name (a LAN or test "
             "swarm). Default: private only when every --initial-peers address (or, with none, --host) is one.")]
    = None,
    max_sessions_per_client: Annotated[int, typer.Option(
        help="Open sessions one client may hold.")] = PeerConfig.max_sessions_per_client,
    client_cache_share: Annotated[float, typer.Option(
        help="Share of the KV cache one client may hold.")] = PeerConfig.client_cache_share,
    allow_client: Annotated[list[str] | None, typer.Option(help="Serve only these client ids (repeat).")] = None,
    block_client: Annotated[list[str] | None, typer.Option(help="Refuse these client ids (repeat).")] = None,
    allow_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: store, read, forward to and accept pushes from only these "
             "peers (a private swarm; give every node the same file).")] = None,
    block_peers: Annotated[str | None, typer.Option(
        help="File of peer ids, one per line: never store their records, route to them or accept their pushes.")]
    = None,
    max_session_length: Annotated[int, typer.Option(
        help="Positions per sequence a session may ask for (at most the model's max_position_embeddings).")]
    = PeerConfig.max_session_length,
    max_batch_tokens: Annotated[int, typer.Option(
        help="Positions one batched pass may compute.")] = PeerConfig.max_batch_tokens,
    step_timeout: Annotated[float, typer.Option(
        help="Seconds one step or Forward pass may take here.")] = PeerConfig.step_timeout_s,
    prefill_chunk_tokens: Annotated[int, typer.Option(
        help="Prefill chunk size (pipelining, fairness).")] = PeerConfig.prefill_chunk_tokens,
    batch_window_ms: Annotated[float, typer.Option(
        help="Cap (ms) on waiting for busy sessions' steps.")] = PeerConfig.batch_window_ms,
    batch_invariant: Annotated[bool, typer.Option(
        "--batch-invariant", help="One step per pass in fixed chunks: results independent of other sessions, "
        "replays bit-exact (costs throughput under concurrency).")] = PeerConfig.batch_invariant,
    num_layers: Annotated[int | None, typer.Option(
        help="With --layers auto: how many layers to host (default: as many as fit).")] = None,
    throughput: Annotated[str, typer.Option(
        help="Tokens/s per layer to announce: auto (cached, else measured), eval (measure now), "
             "or DECODE[:PREFILL] fixed.")] = PeerConfig.throughput,
    throughput_cache: Annotated[str | None, typer.Option(
        help="File of past throughput measurements (default: ~/.cache/brigade/throughput.json; '' = none).")] = None,
    ping_period: Annotated[float, typer.Option(
        help="Seconds between round-trip measurements to the next layers' peers (0 = never).")]
    = PeerConfig.ping_period_s,
    rebalance_period: Annotated[float, typer.Option(
        help="Mean seconds between re-checks of where this peer is most useful (0 = never; auto layers only).")]
    = PeerConfig.rebalance_period_s,
    rebalance_gain: Annotated[float, typer.Option(
        help="Move only when the swarm's weakest point rises by at least this fraction.")]
    = PeerConfig.rebalance_min_gain,
    move_drain: Annotated[float, typer.Option(
        help="Seconds a moving peer lets open sessions leave before it closes them.")] = PeerConfig.move_drain_s,
    reachability: Annotated[str, typer.Option(
        help="auto: ask other peers to dial back and serve through a relay if they cannot; direct: assume "
             "reachable (no check); relayed: always serve through a relay.")] = PeerConfig.reachability,
    relay: Annotated[bool, typer.Option(
        "--relay", help="Relay for peers that cannot accept connections (only while this peer is reachable).")]
    = PeerConfig.relay,
    relay_port: Annotated[int, typer.Option(
        help="TCP port relayed peers' clients connect to (0 = any).")] = PeerConfig.relay_port,
    relay_announce_port: Annotated[int | None, typer.Option(
        help="Relay port clients dial (default: the bound --relay-port).")] = None,
    relay_max_peers: Annotated[int, typer.Option(help="Peers relayed here at once.")] = PeerConfig.relay_max_peers,
    relay_max_connections: Annotated[int, typer.Option(
        help="Client connections relayed at once.")] = PeerConfig.relay_max_connections,
    relay_max_bytes: Annotated[str, typer.Option(
        help="Bytes relayed per relayed peer per hour, e.g. 4GiB (0 = no cap).")] = RELAY_MAX_BYTES,
    relayed_backend: Annotated[str | None, typer.Option(
        help="host:port a relayed peer hands its relayed connections to (default: its own gRPC port; "
             "testbeds: a delay proxy).")] = None,
    ready_file: Annotated[str | None, typer.Option(
        help="Write a JSON line (peer id, address, layers, certificate, ...) to this file, atomically, once "
             "the peer serves and is announced: how launchers and tests know it is ready.")] = None,
) -> None:
    """Host layers START:END of MODEL, serve them over gRPC and announce them on the DHT."""
    config = config_from_options(dict(locals()))  # first: the parameters, by name
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
    from brigade.peer.server import main

    main(config)


def config_from_options(options: dict[str, Any]) -> PeerConfig:
    """The config ``run``'s parameters describe: each becomes the field of its name, except the few
    renamed (``RENAMED``) or converted below; the config checks the values itself."""
    from brigade.kernels.memory import parse_bytes
    from brigade.routing.peer_filter import PeerFilter

    options = dict(options)
    layers = options.pop("layers")
    fields: dict[str, Any] = {}
    fields["start_layer"], fields["end_layer"] = (None, None) if layers == "auto" else parse_layers(layers)
    fields["initial_peers"] = tuple(options.pop("initial_peers"))
    dht_listen = options.pop("dht_listen")
    if dht_listen:
        fields["dht_listen"] = tuple(dht_listen)
    try:
        peers = PeerFilter.from_files(options.pop("allow_peers"), options.pop("block_peers"))
        clients = PeerFilter.of(options.pop("allow_client"), options.pop("block_client") or ())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    fields.update(allowed_peers=peers.allow, blocked_peers=peers.block,
                  allowed_clients=clients.allow, blocked_clients=clients.block)
    max_memory = options.pop("max_memory")
    fields["max_memory_bytes"] = _size(parse_bytes, max_memory, "--max-memory") if max_memory else None
    fields["relay_max_bytes_per_hour"] = _size(parse_bytes, options.pop("relay_max_bytes"), "--relay-max-bytes")
    for name in ("ping_period", "rebalance_period", "move_drain"):  # below zero means never, as zero does
        options[name] = max(0.0, options[name])
    fields.update({RENAMED.get(name, name): value for name, value in options.items()})
    fields["relay_max_connections_per_peer"] = min(PeerConfig.relay_max_connections_per_peer,
                                                   fields["relay_max_connections"])
    try:
        return PeerConfig(**fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _size(parse: Any, text: str, flag: str) -> int:
    try:
        return int(parse(text))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from e
