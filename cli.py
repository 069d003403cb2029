"""The one `brigade` command: gathers the subcommands each package defines."""

from __future__ import annotations

import os

# Peers and clients on one machine take turns on its cores: idle OpenMP threads must sleep, not
# spin. This only works before torch loads OpenMP, hence here, before any other import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from brigade.client.api.cli import serve
from brigade.client.cli import generate
from brigade.dashboard.cli import dashboard, swarm_app
from brigade.demo import demo
from brigade.peer.cli import app as peer_app
from brigade.peer.lifetime import children_die_with_this_process
from brigade.routing.cli import dht

# hivemind forks a DHT process (which starts p2pd) in every command that joins the swarm; if this
# process is killed, those children must not live on.
children_die_with_this_process()

app = typer.Typer(help="brigade: run large language models across a swarm of peers.", no_args_is_help=True)
app.add_typer(peer_app, name="peer")
app.command()(dht)
app.command()(generate)
app.command()(demo)
app.command()(dashboard)
app.add_typer(swarm_app, name="swarm")
app.command()(serve)
