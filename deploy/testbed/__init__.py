"""A multi-host swarm on one machine: network namespaces, shaped links, real processes.

``python -m brigade.deploy.testbed run --peers 4 --profile internet`` builds the hosts, starts a
bootstrap node, the peers and a client, generates once, prints ms/token against the floor of one
round trip per hop, and removes everything. ``Testbed`` does the same from Python (tests and
``benchmarks/wan.py``).
"""

from brigade.deploy.testbed.netns import TestbedError, namespaces_available, sweep_stale
from brigade.deploy.testbed.profiles import PROFILES, NetProfile, get_profile
from brigade.deploy.testbed.runner import GenerationResult, Testbed, TestbedConfig

__all__ = [
    "PROFILES",
    "GenerationResult",
    "NetProfile",
    "Testbed",
    "TestbedConfig",
    "TestbedError",
    "get_profile",
    "namespaces_available",
    "sweep_stale",
]
