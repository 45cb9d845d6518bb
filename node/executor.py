"""Runs compute off the event loop, on one dedicated thread.

One thread, because torch already parallelises each operation over the cores; running two
forwards at once would only make them contend. Work submitted from the loop is awaited there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


class ComputeExecutor:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _no_grad_call, fn, args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _no_grad_call(fn: Callable[..., T], args: tuple) -> T:
    with torch.no_grad():
        return fn(*args)
