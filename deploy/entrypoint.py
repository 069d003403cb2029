"""Containers and service units configure brigade through environment variables, one per CLI flag.

``python -m brigade.deploy.entrypoint peer run`` reads ``BRIGADE_*`` variables, turns them into the
flags of ``brigade peer run`` and execs it. The mapping is a rule, not a table, so it can never
fall behind the CLI: a flag ``--foo-bar`` is ``BRIGADE_FOO_BAR``, a positional argument ``MODEL``
is ``BRIGADE_MODEL``. Flags that repeat (``--initial-peers``) take a comma- or space-separated
list; on/off flags take ``true``/``false`` (also 1/0, yes/no). Arguments after the command are
passed on as they are and win over the environment.

Two variables belong to the entrypoint itself (they join containers that share a volume):

- ``BRIGADE_PUBLISH_MADDRS=FILE`` (``dht`` only): once the node is up, write the multiaddrs it
  prints to FILE (the entrypoint stays the node's parent, passing signals on).
- ``BRIGADE_INITIAL_PEERS_FILE=FILE``: wait up to ``BRIGADE_INITIAL_PEERS_WAIT`` seconds (120) for
  FILE and join the multiaddrs it lists, in addition to ``BRIGADE_INITIAL_PEERS``.

``--print`` before the command prints the command line instead of running it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_PREFIX = "BRIGADE_"
PUBLISH_MADDRS = "BRIGADE_PUBLISH_MADDRS"
INITIAL_PEERS_FILE = "BRIGADE_INITIAL_PEERS_FILE"
INITIAL_PEERS_WAIT = "BRIGADE_INITIAL_PEERS_WAIT"
OWN_VARIABLES = {PUBLISH_MADDRS, INITIAL_PEERS_FILE, INITIAL_PEERS_WAIT}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class EntrypointError(ValueError):
    """The environment does not describe a valid command line; the message names the variable."""


# typer builds its commands on a click it carries inside itself, so commands are told apart by what
# they can do (a group lists subcommands), not by class.
Command = Any
Param = Any


def _is_group(command: Command) -> bool:
    return hasattr(command, "list_commands")


def _is_option(param: Param) -> bool:
    return param.param_type_name == "option"


def _context(command: Command) -> Any:
    return command.context_class(command)


def root_command() -> Command:
    import typer

    from brigade.cli import app

    return typer.main.get_command(app)


def _resolve(path: list[str], root: Command) -> Command:
    command: Command = root
    context = _context(root)
    for name in path:
        if not _is_group(command):
            raise EntrypointError(f"`brigade {' '.join(path)}`: {command.name} has no subcommands")
        found = command.get_command(context, name)
        if found is None:
            choices = ", ".join(command.list_commands(context))
            raise EntrypointError(f"`brigade {' '.join(path)}`: no command {name!r} (choose from {choices})")
        command = found
    return command


def find_command(path: list[str], root: Command | None = None) -> Command:
    """The click command for ``["peer", "run"]``; raises EntrypointError naming the choices otherwise."""
    root = root or root_command()
    command = _resolve(path, root)
    if _is_group(command):
        choices = ", ".join(command.list_commands(_context(command)))
        raise EntrypointError(f"`brigade {' '.join(path)}` needs a subcommand: {choices}")
    return command


def env_name(param: Param) -> str:
    """``--initial-peers`` -> ``BRIGADE_INITIAL_PEERS``; positional ``model`` -> ``BRIGADE_MODEL``."""
    if _is_option(param):
        long_names = [opt for opt in param.opts if opt.startswith("--")]
        name = max(long_names, key=len)[2:] if long_names else (param.name or "")
    else:
        name = param.name or ""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def mapping(command: Command) -> list[tuple[str, Param]]:
    """Every variable the command reads, with its parameter, in the command's order."""
    return [(env_name(param), param) for param in command.params
            if not (_is_option(param) and param.hidden) and param.name != "help"]


def _split(value: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", value.strip()) if item]


def flags_from_env(command: Command, env: dict[str, str], display: str = "", *, strict: bool = True) -> list[str]:
    """The command line (arguments after the command's name) that ``env`` describes.

    ``strict``: a required positional argument missing from ``env`` is an error (otherwise it is
    left to arguments given after the command, such as a prompt).
    """
    display = display or str(command.name)
    positional: list[str] = []
    options: list[str] = []
    for name, param in mapping(command):
        value = env.get(name)
        if value is None or value == "":
            if strict and not _is_option(param) and param.required:
                raise EntrypointError(f"set {name} (the {param.name.upper() if param.name else 'argument'} "
                                      f"of `brigade {display}`)")
            continue
        if not _is_option(param):
            positional += _split(value) if param.nargs != 1 else [value]
            continue
        if param.is_flag:
            lowered = value.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise EntrypointError(f"{name} must be true or false, got {value!r}")
            wanted = lowered in _TRUE
            on = max((opt for opt in param.opts if opt.startswith("--")), key=len)
            off = next((opt for opt in param.secondary_opts if opt.startswith("--")), None)
            if wanted:
                options.append(on)
            elif off is not None:
                options.append(off)
            continue
        flag = max((opt for opt in param.opts if opt.startswith("--")), key=len)
        values = _split(value) if param.multiple else [value]
        for item in values:
            options += [flag, item]
    return positional + options


def unknown_variables(env: dict[str, str], root: Command) -> list[str]:
    """``BRIGADE_*`` variables that no command of brigade reads: most likely typos."""
    known = set(OWN_VARIABLES)
    context = _context(root)

    def walk(group: Command) -> None:
        for name in group.list_commands(context):
            command = group.get_command(context, name)
            if _is_group(command):
                walk(command)
            elif command is not None:
                known.update(var for var, _ in mapping(command))

    walk(root)
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)


def wait_for_maddrs(path: Path, timeout_s: float) -> list[str]:
    """Multiaddrs another container published to ``path`` (JSON list, or one per line)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        if text.strip():
            try:
                data: Any = json.loads(text)
            except ValueError:
                data = text.split()
            maddrs = [str(item) for item in (data if isinstance(data, list) else [data])]
            if maddrs:
                return maddrs
        if time.monotonic() >= deadline:
            raise EntrypointError(f"{INITIAL_PEERS_FILE}: {path} did not appear within {timeout_s:.0f} s; "
                                  f"is the bootstrap node running and sharing that volume?")
        time.sleep(0.5)


def build_argv(path: list[str], extra: list[str], env: dict[str, str]) -> list[str]:
    """The full ``brigade ...`` argument list for command ``path``."""
    root = root_command()
    command = find_command(path, root)
    for name in unknown_variables(env, root):
        logger.warning("ignoring %s: no brigade command has the flag it would set", name)
    env = dict(env)
    if env.get(INITIAL_PEERS_FILE):
        if "BRIGADE_INITIAL_PEERS" not in {name for name, _ in mapping(command)}:
            raise EntrypointError(f"{INITIAL_PEERS_FILE} is set but `brigade {' '.join(path)}` has no --initial-peers")
        published = wait_for_maddrs(Path(env[INITIAL_PEERS_FILE]), float(env.get(INITIAL_PEERS_WAIT, "120")))
        env["BRIGADE_INITIAL_PEERS"] = " ".join([*_split(env.get("BRIGADE_INITIAL_PEERS", "")), *published])
    return [*path, *flags_from_env(command, env, ' '.join(path), strict=not extra), *extra]


def reachable_from_elsewhere(maddrs: list[str]) -> list[str]:
    """Drops loopback multiaddrs, which mean nothing in another container, unless nothing else is left."""
    outside = [maddr for maddr in maddrs if not maddr.startswith(("/ip4/127.", "/ip6/::1/"))]
    return outside or maddrs


def run_publishing(argv: list[str], target: Path) -> int:
    """Runs ``brigade argv`` as a child, copies its output, and writes its multiaddrs to ``target`` once ready."""
    from brigade.routing.cli import READY_MARK

    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # a file from an earlier run must not be taken for this one's
    child = subprocess.Popen([sys.executable, "-m", "brigade", *argv], stdout=subprocess.PIPE, text=True, bufsize=1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith(READY_MARK + " "):
            maddrs = reachable_from_elsewhere(json.loads(line[len(READY_MARK) + 1 :])["maddrs"])
            partial = target.with_name(target.name + ".partial")
            partial.write_text(json.dumps(maddrs))
            partial.replace(target)  # readers see the whole list or nothing
    return child.wait()


def split_command(args: list[str], root: Command) -> tuple[list[str], list[str]]:
    """``["peer", "run", "--port", "1"]`` -> ``(["peer", "run"], ["--port", "1"])``: names down to a command."""
    path: list[str] = []
    command: Command = root
    while _is_group(command) and len(path) < len(args) and not args[len(path)].startswith("-"):
        path.append(args[len(path)])
        command = _resolve(path, root)
    return path, args[len(path):]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = bool(args) and args[0] == "--print"
    if dry_run:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m brigade.deploy.entrypoint [--print] COMMAND [SUBCOMMAND] [FLAGS...]")
    try:
        path, extra = split_command(args, root_command())
        full = build_argv(path, extra, dict(os.environ))
    except EntrypointError as e:
        sys.exit(f"brigade entrypoint: {e}")
    if dry_run:
        print(shlex.join(["brigade", *full]))
        return
    logger.info("running: %s", shlex.join(["brigade", *full]))
    publish = os.environ.get(PUBLISH_MADDRS)
    if publish and path == ["dht"]:
        sys.exit(run_publishing(full, Path(publish)))
    os.execv(sys.executable, [sys.executable, "-m", "brigade", *full])


if __name__ == "__main__":
    main()
