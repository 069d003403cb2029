"""The public swarm health dashboard: crawls the DHT, probes peers, serves coverage and health."""
