"""Moved to ``brigade.deploy.launcher``; this name stays only while ``client/api/cli.py`` still imports it."""

from brigade.deploy.launcher import DHT_READY, LaunchedProcess, LocalSwarm

__all__ = ["DHT_READY", "LaunchedProcess", "LocalSwarm"]
