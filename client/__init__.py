"""Client library: route management, inference sessions, the homeswarm CLI."""
