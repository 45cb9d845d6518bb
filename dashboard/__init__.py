"""Swarm health dashboard: reads the DHT, probes nodes, serves HTML, JSON and metrics, keeps history.

- `state`: the swarm's state built from records and probes (pure), and its JSON.
- `monitor`: the background refresher (DHT reads, probes, history samples); requests never wait on it.
- `probe`: one timed ``Info`` call per node over asyncio gRPC.
- `history`: SQLite samples, downsampled with age, kept 30 days.
- `page`, `charts`: the server-rendered page and its inline SVG charts (pure).
- `app`: the HTTP routes; `metrics`: the Prometheus collector; `config`, `main`: the CLI.

Importing this package starts nothing.
"""
