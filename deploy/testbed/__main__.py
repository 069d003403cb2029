"""``python -m brigade.deploy.testbed``: run a swarm across network namespaces, or clean up after one."""

from __future__ import annotations

import logging
import shutil
import sys
from typing import Annotated

import typer

from brigade.deploy.testbed.profiles import PROFILES

app = typer.Typer(help="A multi-host brigade swarm on this machine, with real latency.", no_args_is_help=True)


@app.command()
def run(
    model: Annotated[str | None, typer.Argument(help="Checkpoint folder (default: the embedded tiny model).")] = None,
    peers: Annotated[int, typer.Option(help="Peer hosts, each serving consecutive layers.")] = 4,
    profile: Annotated[str, typer.Option(help=f"Link profile: {' | '.join(PROFILES)}.")] = "internet",
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "def main():\n",
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 32,
    mode: Annotated[str, typer.Option(help="How tokens travel: client (client-driven pipeline).")] = "client",
    seed: Annotated[int, typer.Option(help="Draws each peer's round trip within the profile.")] = 0,
    emulation: Annotated[str, typer.Option(help="auto | proxy | netem: what adds the delay.")] = "auto",
    keep_logs: Annotated[bool, typer.Option(help="Keep the processes' logs after the run.")] = False,
) -> None:
    """Build hosts and links, start a bootstrap node, peers and a client, generate, tear it all down."""
    try:
        _run(model, peers, profile, prompt, new_tokens, mode, seed, emulation, keep_logs)
    except KeyboardInterrupt:  # wherever it lands (also outside the testbed's own handling): Ctrl-C's status
        typer.echo("interrupted: the testbed was torn down", err=True)
        raise typer.Exit(130) from None


def _run(model: str | None, peers: int, profile: str, prompt: str, new_tokens: int, mode: str, seed: int,
         emulation: str, keep_logs: bool) -> None:
    from brigade.demo import split_layers
    from brigade.deploy.testbed.netns import namespaces_available
    from brigade.deploy.testbed.runner import Testbed, TestbedConfig
    from brigade.kernels.default_model import DEFAULT_MODEL_DIR
    from brigade.kernels.loading import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    reason = namespaces_available()
    if reason:
        typer.echo(f"cannot run the testbed: {reason}", err=True)
        raise typer.Exit(2)
    model = model or str(DEFAULT_MODEL_DIR)
    spans = split_layers(load_config(model).num_hidden_layers, peers)
    testbed = Testbed(TestbedConfig(model=model, spans=tuple(spans), profile=profile, seed=seed, emulation=emulation))
    try:
        with testbed:
            typer.echo(f"testbed {testbed.run_id}: {len(spans)} peers, profile {profile}, delay by "
                       f"{'netem' if testbed.network.netem else 'delay proxies'}; logs in {testbed.log_dir}")
            for peer in testbed.peers:
                typer.echo(f"  {peer.host.role} {peer.host.address} rtt {peer.host.rtt_ms:g} ms "
                           f"serves {peer.info.get('layers')}")
            result = testbed.generate(prompt=prompt, new_tokens=new_tokens, mode=mode)
    finally:
        if testbed.log_dir and not keep_logs:
            shutil.rmtree(testbed.log_dir, ignore_errors=True)
    from transformers import AutoTokenizer

    from brigade.kernels.checkpoint import resolve_config_folder

    text = AutoTokenizer.from_pretrained(resolve_config_folder(model)).decode(result.tokens)
    typer.echo(f"\n{prompt}{text}\n")
    typer.echo(f"{len(result.tokens)} tokens: {result.ms_per_token:.1f} ms/token after the first (floor: one "
               f"round trip per hop = {result.floor_ms:.1f} ms), first token {result.first_token_ms:.0f} ms")
    typer.echo(f"route: {result.describe_route()}")


@app.command()
def cleanup() -> None:
    """Remove namespaces and processes left by testbed runs that were killed (never a live run's)."""
    from brigade.deploy.testbed.netns import sweep_stale

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    removed = sweep_stale()
    typer.echo(f"removed {len(removed)} leftover namespaces" if removed else "nothing to clean up")


if __name__ == "__main__":
    sys.exit(app(prog_name="python -m brigade.deploy.testbed"))
