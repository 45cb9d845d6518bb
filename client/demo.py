"""`homeswarm demo` (`make demo`): a bootstrap peer and N nodes on loopback serving the bundled demo
model, a text streamed to the terminal through them, tokens/s, and the command to join one more node.
Everything started is stopped on exit, Ctrl-C included."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.tokenizer import TextCodec
from homeswarm.model import DEMO_MODEL_DIR, ModelConfig


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def script_command(name: str, *, path: str | None = None, cwd: str | None = None) -> str:
    """How to type console script ``name`` in this shell: its bare name where PATH finds the one beside this
    Python (an activated virtual environment), else its path (``.venv/bin/join-swarm`` from the checkout)."""
    script = Path(sys.executable).parent / name
    found = shutil.which(name, path=path)
    if found is not None and Path(found).resolve() == script.resolve():
        return name
    return shown_path(script, cwd=cwd)


def shown_path(path: str | os.PathLike[str], *, cwd: str | None = None) -> str:
    """``path`` relative to the working directory where it lies below it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path(cwd or os.getcwd()).absolute()))
    except ValueError:
        return str(path)


def join_hint(join_swarm: str, model_dir: str, initial_peers: list[str], *, keep_running: bool) -> str:
    """What the demo says last: how to add a node to the swarm while it runs, or how to keep it running."""
    if not keep_running:
        return ("\nThe swarm stops now. To keep it up and add nodes or clients of your own, run the demo with "
                "--keep-running (homeswarm demo --keep-running, or make demo DEMO_ARGS=--keep-running).\n")
    return (f"\nAdd a node to this swarm (in another terminal, while it runs) with:\n  {join_swarm} {model_dir} "
            f"--initial-peers {' '.join(initial_peers)} --num-blocks 2\n")


def run_demo(args: argparse.Namespace) -> int:
    from homeswarm.client.model import AutoDistributedModelForCausalLM

    model_dir = DEMO_MODEL_DIR
    config = ModelConfig.from_dir(model_dir)
    spans = split_blocks(config.num_hidden_layers, args.nodes)
    codec = TextCodec.for_model(model_dir)
    assert codec is not None, "the demo model ships its tokenizer.json"
    with LocalSwarm() as swarm:
        t0 = time.perf_counter()
        _say("starting a bootstrap peer on 127.0.0.1 ...")
        swarm.start_bootstrap()
        daemons = []
        for start, end in spans:
            blocks = f"block {start}" if end - start == 1 else f"blocks {start}:{end}"
            _say(f"starting join-swarm for {blocks} ...")
            daemons.append(swarm.start_node(model_dir, "--blocks", f"{start}:{end}", wait=False))
        for daemon in daemons:
            swarm.wait_ready(daemon)
        _say(f"swarm of {len(daemons)} nodes up in {time.perf_counter() - t0:.1f} s\n")
        with AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers) as model:
            ids = codec.encode(args.prompt)
            sys.stdout.write(args.prompt)
            sys.stdout.flush()
            new_ids: list[int] = []
            printed = ""
            start_time = time.perf_counter()
            first = None
            for tokens in model.generate_stream(
                [ids], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0, top_k=args.top_k, seed=args.seed,
            ):
                first = first if first is not None else time.perf_counter()
                new_ids.append(int(tokens[0]))
                text = codec.decode(new_ids)
                if text.startswith(printed):
                    sys.stdout.write(text[len(printed):])
                    sys.stdout.flush()
                    printed = text
            end_time = time.perf_counter()
            rate = (len(new_ids) - 1) / (end_time - first) if first and len(new_ids) > 1 else 0.0
            sys.stdout.write("\n\n")
            _say(f"{len(new_ids)} tokens through {len(daemons)} nodes: {rate:.1f} tokens/s "
                 f"(first token after {(first or end_time) - start_time:.2f} s)")
        _say(join_hint(script_command("join-swarm"), shown_path(model_dir), swarm.initial_peers,
                       keep_running=args.keep_running))
        if args.keep_running:
            _say("the swarm keeps running (homeswarm demo --keep-running); Ctrl-C stops it")
            try:
                while all(d.process.poll() is None for d in daemons):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        _say("stopping the swarm ...")
    return 0
