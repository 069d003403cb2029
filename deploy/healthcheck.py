"""Container and service health checks: exit 0 when the process serves, 1 (with the reason) when not.

    python -m brigade.deploy.healthcheck peer [HOST:PORT]   # the peer answers its Info RPC
    python -m brigade.deploy.healthcheck dht [HOST:PORT]    # the DHT node accepts connections
    python -m brigade.deploy.healthcheck http [URL]         # the dashboard answers over HTTP

Without an address each check reads the same ``BRIGADE_*`` variables the entrypoint turns into
flags (``BRIGADE_HOST``/``BRIGADE_PORT``, ``BRIGADE_LISTEN``), so a health check in an image or a
unit needs no configuration of its own. A wildcard bind (0.0.0.0, ::) is checked on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.error
import urllib.request

DEFAULT_PEER_PORT = 31330
DEFAULT_DHT_PORT = 31337
DEFAULT_DASHBOARD_PORT = 8080
_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def _local(host: str) -> str:
    return "127.0.0.1" if host in _WILDCARDS else host


def peer_address(env: dict[str, str]) -> str:
    return f"{_local(env.get('BRIGADE_HOST', '127.0.0.1'))}:{env.get('BRIGADE_PORT', DEFAULT_PEER_PORT)}"


def dht_address(env: dict[str, str]) -> str:
    """The first ``/ip4/HOST/tcp/PORT`` of ``BRIGADE_LISTEN``, as HOST:PORT."""
    for maddr in env.get("BRIGADE_LISTEN", "").replace(",", " ").split():
        parts = maddr.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6", "dns4", "dns6", "dns") and parts[2] == "tcp":
            return f"{_local(parts[1])}:{parts[3]}"
    return f"127.0.0.1:{DEFAULT_DHT_PORT}"


def dashboard_url(env: dict[str, str]) -> str:
    return f"http://{_local(env.get('BRIGADE_HOST', '127.0.0.1'))}:{env.get('BRIGADE_PORT', DEFAULT_DASHBOARD_PORT)}/"


def check_peer(address: str, timeout_s: float = 5.0) -> str | None:
    """None when the peer at ``address`` answers Info, else why not."""
    from brigade.protocol import brigade_pb2 as pb
    from brigade.protocol import brigade_pb2_grpc as pb_grpc
    from brigade.protocol.channels import dial

    async def ask() -> str | None:
        # Our own peer on this host: trust the certificate it presents (a client pins the one in its
        # signed record instead); a peer run with --insecure answers in plain text.
        cert = _presented_certificate(address, timeout_s)
        async with dial(address, cert, allow_insecure=not cert) as channel:
            info = await pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
        return None if info.peer_id else "Info answered without a peer id"

    try:
        return asyncio.run(ask())
    except Exception as e:
        return f"peer at {address} did not answer Info: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _presented_certificate(address: str, timeout_s: float) -> str:
    """The PEM certificate the server at ``address`` presents, or "" when it does not speak TLS."""
    import ssl

    host, port = address.rsplit(":", 1)
    try:
        return ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout_s)
    except ssl.SSLError:
        return ""


def check_tcp(address: str, timeout_s: float = 5.0) -> str | None:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return f"nothing accepts connections at {address}: {e}"


def check_http(url: str, timeout_s: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        return f"{url} did not answer: {e}"
    return None if status < 500 else f"{url} answered HTTP {status}"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    kind = args[0] if args else "peer"
    target = args[1] if len(args) > 1 else None
    if kind == "peer":
        problem = check_peer(target or peer_address(env))
    elif kind == "dht":
        problem = check_tcp(target or dht_address(env))
    elif kind == "http":
        problem = check_http(target or dashboard_url(env))
    else:
        sys.exit(f"unknown check {kind!r}: use peer, dht or http")
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        sys.exit(1)
    print("healthy")


if __name__ == "__main__":
    main()
