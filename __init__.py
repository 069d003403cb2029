"""brigade: run large language models across a peer-to-peer swarm."""

__version__ = "0.1.0"
