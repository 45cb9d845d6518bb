"""The serving side of the Weights rpc: a block's checkpoint tensors streamed to a peer that fetches them, and
a client's files (its "head": embeddings, final norm, LM head; its tokenizer) to a client that fetches those.

Costs the node little: bytes are read from the checkpoint files on disk (``node.weight_stream``; never
the in-memory, possibly quantized, tensors) in small reads on the event loop, so no thread competes
with the compute thread; before each chunk the upload waits while compute has steps queued, so it
never delays an inference step by more than one small read; all uploads together are held to
``--upload-limit`` bytes per second (0: no uploads) by one token bucket, and at most ``max_uploads``
run at once. When a serving period ends (``--idle-only`` and the owner back, a move, a stop) uploads end
at once (``stop``), before open sessions get their grace; the fetching peer resumes elsewhere at the offset
it reached.

Invariants: a request is checked (model, block held, offset) before any byte is read; every refusal is
a gRPC status with a one-line message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from homeswarm.model.hub import CLIENT_FILES
from homeswarm.node.weight_stream import (
    BlockLayout,
    WeightStreamError,
    block_layout,
    file_layout,
    head_layout,
    layout_digest,
    read_range,
)
from homeswarm.protocol import node_pb2

logger = logging.getLogger(__name__)

MAX_CHUNK = 1 << 18  # bytes per message at most
READ_SIZE = 1 << 16  # bytes per read on the event loop (tens of microseconds from the page cache)
BUSY_POLL = 0.005  # seconds between looks at the compute queue while it has work
DEFAULT_MAX_UPLOADS = 4
HEAD_FILE = "head"  # a client's embeddings, final norm and LM head, as one canonical safetensors file
CLIENT_FILE_NAMES = (HEAD_FILE, *CLIENT_FILES)


class TokenBucket:
    """``rate`` bytes per second in bursts of ``burst``; ``reserve`` says how long to wait before sending."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def reserve(self, size: int, now: float) -> float:
        """Book ``size`` bytes; the seconds to wait before they may go (0 when the bucket holds them)."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= size
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class WeightUploader:
    def __init__(self, model_dir: str | Path, model_name: str, *, rate: float, busy: Callable[[], bool] = lambda: False,
                 max_uploads: int = DEFAULT_MAX_UPLOADS, clock: Callable[[], float] = time.monotonic,
                 corrupt: bool = False) -> None:
        """``rate``: bytes per second for all uploads together (0: none; inf: no limit); ``busy``: whether compute
        has work waiting (uploads wait meanwhile); ``corrupt``: flip bits of every tensor byte sent (a faulty
        node, for testing the fetchers' digest checks)."""
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.rate = rate
        self.busy = busy
        self.max_uploads = max_uploads
        self.clock = clock
        self.corrupt = corrupt
        limited = 0 < rate < float("inf")
        # a slow limit sends small chunks (an eighth of a second's bytes), so a transfer moves steadily and a
        # broken one loses little; the bucket lets a quarter of a second's bytes go at once
        self.max_chunk = min(MAX_CHUNK, max(4096, int(rate / 8))) if limited else MAX_CHUNK
        self.bucket = TokenBucket(rate, max(rate / 4, self.max_chunk), clock()) if limited else None
        self.active = 0
        self.bytes_sent = 0
        self.stopped: str | None = None  # why uploads ended (the period's end), None while they run
        self._layouts: dict[int, BlockLayout | None] = {}
        self._files: dict[str, BlockLayout | None] = {}

    def stop(self, why: str) -> None:
        """End every upload at its next chunk and refuse new ones (the node steps aside or stops)."""
        self.stopped = why

    def file_layout(self, name: str) -> BlockLayout | None:
        """A client's file: "head" (the tensors of no block) or a tokenizer or generation config file."""
        if name not in self._files:
            path = self.model_dir / name
            self._files[name] = (head_layout(self.model_dir) if name == HEAD_FILE
                                 else file_layout(path) if path.is_file() else None)
        return self._files[name]

    def file_digests(self) -> dict[str, str]:
        """sha256 of each client file this node can send (reads them all: run it off the event loop)."""
        digests = {}
        for name in CLIENT_FILE_NAMES:
            try:
                layout = self.file_layout(name)
            except WeightStreamError as e:
                logger.warning("cannot offer %s to clients: %s", name, e)
                continue
            if layout is not None:
                digests[name] = layout_digest(layout)
        return digests

    def layout(self, block: int) -> BlockLayout | None:
        if block not in self._layouts:
            self._layouts[block] = block_layout(self.model_dir, block)
        return self._layouts[block]

    async def stream(self, request: node_pb2.WeightsRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.WeightsChunk]:
        if self.rate <= 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this node does not upload weights (--upload-limit 0)")
        if self.stopped is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this node stopped uploading: {self.stopped}")
        if request.model != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this node serves model {self.model_name!r}, "
                                f"not {request.model[:120]!r}")
        if request.file and request.file not in CLIENT_FILE_NAMES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"file must be one of "
                                f"{', '.join(CLIENT_FILE_NAMES)}, got {request.file[:80]!r}")
        what = f"file {request.file}" if request.file else f"block {request.block}"
        try:
            layout = self.file_layout(request.file) if request.file else self.layout(request.block)
        except WeightStreamError as e:
            logger.warning("cannot upload %s: %s", what, e)
            layout = None
        if layout is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this node does not hold the checkpoint files of {what}")
        total = layout.total_bytes
        if request.offset > total:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {what}'s "
                                f"{total} bytes")
        if self.active >= self.max_uploads:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"already uploading to {self.active} peers; "
                                f"try another node or later")
        chunk = min(request.chunk_size or self.max_chunk, self.max_chunk)
        self.active += 1
        offset = request.offset
        try:
            while offset < total:
                while self.busy() and self.stopped is None:  # inference first: an upload only fills the gaps
                    await asyncio.sleep(BUSY_POLL)
                if self.stopped is not None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"this node stopped uploading: {self.stopped}")
                size = min(chunk, total - offset)
                if self.bucket is not None:
                    delay = self.bucket.reserve(size, self.clock())
                    if delay > 0:
                        await asyncio.sleep(delay)
                data = bytearray()
                while len(data) < size:
                    data += read_range(layout, offset + len(data), min(READ_SIZE, size - len(data)))
                    await asyncio.sleep(0)
                if self.corrupt:
                    self._corrupt(data, offset, len(layout.header))
                yield node_pb2.WeightsChunk(offset=offset, data=bytes(data), total_bytes=total)
                offset += size
                self.bytes_sent += size
        finally:
            self.active -= 1

    @staticmethod
    def _corrupt(data: bytearray, offset: int, header_bytes: int) -> None:
        for i in range(max(0, header_bytes - offset), len(data)):  # the tensors' bytes; the header stays valid
            data[i] ^= 0x01
