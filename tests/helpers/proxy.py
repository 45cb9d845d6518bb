"""A TCP proxy on 127.0.0.1 that delays every chunk by a fixed time in each direction.

It runs its own event loop in a background thread; ``close()`` stops it and every connection.
Order is preserved: chunks are delivered in arrival order, each ``delay`` seconds after it arrived.
``bytes_to_target`` counts the bytes received from clients (whether delivered yet or not), so a test can
tell that a request has left its sender and is held here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class DelayingProxy:
    def __init__(self, target_host: str, target_port: int, delay: float):
        self.target = (target_host, target_port)
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.bytes_forwarded = 0
        self.bytes_to_target = 0
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the proxy did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(src, dst, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                dst.write(data)
                self.bytes_forwarded += len(data)
                await dst.drain()
            dst.close()

        sender = asyncio.create_task(deliver())
        self._tasks.add(sender)
        sender.add_done_callback(self._tasks.discard)
        try:
            while data := await src.read(65536):
                queue.put_nowait((self.loop.time() + self.delay, data))
                if upstream:
                    self.bytes_to_target += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, None))
            with contextlib.suppress(Exception):
                await sender

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # none left pending when the loop stops

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> DelayingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
