"""``python -m homeswarm.dashboard``: the same as `homeswarm dashboard`."""

from homeswarm.dashboard.main import main

main()
