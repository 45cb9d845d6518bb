"""Swarm health dashboard: reads the DHT, probes nodes, serves HTML and JSON."""
