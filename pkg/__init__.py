"""homeswarm: run large language models on a swarm of ordinary computers.

The top-level package only re-exports the public client API, lazily, so that importing any
subpackage (``homeswarm.protocol``, ``homeswarm.model``...) does not pull in the client.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "AutoDistributedModelForCausalLM":
        from homeswarm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'homeswarm' has no attribute {name!r}")
