"""The floor under a hop: a bare gRPC stream echo of a decoding step's hidden state.

    python bench/bench_grpc_floor.py [--hidden 256] [--steps 2000]

A sync client (as homeswarm's client) and an asyncio + uvloop server (as a node) in another process,
the same message types, no compute: what one hop costs before any of our code runs. Three clients:
the sync stream read by the calling thread, the sync stream read by a reader thread (as homeswarm's
HopStream does, to wait on several hops with timeouts), and an asyncio client that runs every step
inside one event loop (what a client without the sync stream's threads could reach).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import queue
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from homeswarm.protocol import deserialize_tensor, node_pb2, node_pb2_grpc, serialize_tensor  # noqa: E402


class Echo(node_pb2_grpc.NodeServicer):
    async def Inference(self, request_iterator, context):  # noqa: N802
        async for request in request_iterator:
            yield node_pb2.InferenceResponse(
                result=node_pb2.StepResult(step_id=request.step.step_id, hidden=request.step.hidden)
            )


def serve(ports: mp.Queue) -> None:
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServicer_to_server(Echo(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


async def _aio_ms(port: int, request, steps: int) -> float:  # noqa: ANN001
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = node_pb2_grpc.NodeStub(channel).Inference()
        for i in range(50 + steps):
            if i == 50:
                t0 = time.perf_counter()
            await call.write(request(i))
            deserialize_tensor((await call.read()).result.hidden)
        call.cancel()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    ports: mp.Queue = mp.Queue()
    server = mp.Process(target=serve, args=(ports,), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=30)
        hidden = torch.randn(1, 1, args.hidden)

        def request(i: int) -> node_pb2.InferenceRequest:
            return node_pb2.InferenceRequest(step=node_pb2.Step(step_id=i, hidden=serialize_tensor(hidden)))

        def per_step_ms(step) -> float:  # noqa: ANN001
            for i in range(50):
                step(i)
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(i)
            return (time.perf_counter() - t0) / args.steps * 1000

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        requests: queue.SimpleQueue = queue.SimpleQueue()
        call = node_pb2_grpc.NodeStub(channel).Inference(iter(requests.get, None))

        def sync_step(i: int) -> None:
            requests.put(request(i))
            deserialize_tensor(next(call).result.hidden)

        results = {"sync stream, caller reads": per_step_ms(sync_step)}
        responses: queue.SimpleQueue = queue.SimpleQueue()

        def reader() -> None:
            with contextlib.suppress(grpc.RpcError):
                for response in call:
                    responses.put(response)

        threading.Thread(target=reader, daemon=True).start()

        def reader_step(i: int) -> None:
            requests.put(request(i))
            deserialize_tensor(responses.get(timeout=30).result.hidden)

        results["sync stream, reader thread"] = per_step_ms(reader_step)
        requests.put(None)
        call.cancel()
        channel.close()
        results["asyncio client, one loop"] = asyncio.run(_aio_ms(port, request, args.steps))
        print(f"bare gRPC stream echo, [1, 1, {args.hidden}] float32, ms per round trip:")
        for name, ms in results.items():
            print(f"  {name:28s} {ms:.3f}")
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
