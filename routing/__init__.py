"""Server records, the route planner and block chooser, and the adapter over hivemind.DHT."""
