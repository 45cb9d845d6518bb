"""Speculative decoding over delaying proxies: tokens per second, plain greedy against each drafter.

    python bench/bench_speculative.py [--delays-ms 0 10 25 50] [--nodes 2 4] [--new-tokens 48] [--rounds 3]
                                      [--draft DIR | --draft-blocks N]

The demo model (model/demo) is split over N nodes, each behind a TCP proxy on 127.0.0.1 that delays each
direction by the given time (announced through --public-address), so every network leg costs that delay.
For each text (the demo's own "ROMEO:" prompt, a repetitive code-like prompt, and a verse repeated three
times) greedy generation runs plain, with prompt lookup, and with a draft model, alternating them round
by round; the table gives the median tokens per second, the median of the per-round speed-ups against plain, and the drafters'
acceptance rates. Every speculative output is checked against the plain one (they must be identical).

The draft model is the bundled draft (model/demo_draft: 2 blocks of hidden 192, the demo's tokenizer,
trained on the demo model's next-token distributions), or another checkpoint given by ``--draft``; with
``--draft-blocks N`` it is built here from the demo model itself instead: its first N blocks with the same
embeddings, final norm and head (an early exit; N = 4, the whole model, is the ceiling of a perfect draft).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table  # noqa: E402
from homeswarm.client.drafters import DraftModelDrafter, PromptLookupDrafter  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm, split_blocks  # noqa: E402
from homeswarm.client.model import AutoDistributedModelForCausalLM  # noqa: E402
from homeswarm.client.tokenizer import TextCodec  # noqa: E402
from tests.helpers.proxy import DelayingProxy  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "model" / "demo"
DEMO_DRAFT = DEMO.parent / "demo_draft"
VERSE = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
         "The slings and arrows of outrageous fortune,\n")
TEXTS = {
    "demo": "ROMEO:\n",  # the demo model's own kind of text
    "code": "".join(f"    def get_{n}(self):\n        return self.{n}\n\n"
                    for n in ("name", "value", "size", "count", "owner")) + "    def get_",
    "repeated": VERSE * 3,  # a passage seen three times: the model goes on repeating what it read
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def early_exit_draft(model_dir: Path, out: Path, blocks: int = 1) -> Path:
    """The first ``blocks`` blocks of ``model_dir`` with its embeddings, final norm and head."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(model_dir / "model.safetensors")
    keep = {name: t for name, t in tensors.items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < blocks}
    save_file(keep, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def run(model, ids: list[int], new_tokens: int, speculative: object) -> tuple[list[int], float, float | None]:
    """(new ids, tokens per second after the first token, acceptance rate)."""
    t0 = time.perf_counter()
    first = None
    out = []
    for tokens in model.generate_stream([ids], max_new_tokens=new_tokens, speculative=speculative):
        if first is None:
            first = time.perf_counter()
        out.append(int(tokens[0]))
    seconds = time.perf_counter() - (first or t0)
    rate = model.last_speculation.acceptance_rate if speculative is not None else None
    return out, (len(out) - 1) / seconds, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0, 10, 25, 50])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--draft", type=Path, default=DEMO_DRAFT, help="the draft model's checkpoint")
    parser.add_argument("--draft-blocks", type=int, default=None,
                        help="draft with the demo model's first N blocks instead (4, the whole model: the "
                        "ceiling of a perfect draft, not a real use)")
    args = parser.parse_args()
    codec = TextCodec.for_model(DEMO)
    assert codec is not None
    prompts = {name: codec.encode(TEXTS[name]) for name in args.texts}
    num_layers = json.loads((DEMO / "config.json").read_text())["num_hidden_layers"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="homeswarm-draft-") as tmp:
        draft = (args.draft if args.draft_blocks is None
                 else early_exit_draft(DEMO, Path(tmp) / "demo-draft", args.draft_blocks))
        # one drafter object across runs, so that no run pays for loading the draft model
        methods = {"plain": None, "prompt-lookup": PromptLookupDrafter(),
                   "draft": DraftModelDrafter(draft, vocab_size=json.loads((DEMO / "config.json").read_text())[
                       "vocab_size"], tokenizer_file=DEMO / "tokenizer.json")}
        for nodes in args.nodes:
            with LocalSwarm() as swarm:
                swarm.start_bootstrap()
                proxies, daemons = [], []
                try:
                    for a, b in split_blocks(num_layers, nodes):
                        port = free_port()
                        proxies.append(DelayingProxy("127.0.0.1", port, 0.0))
                        daemons.append(swarm.start_node(DEMO, "--blocks", f"{a}:{b}", "--port", str(port),
                                                        "--public-address", proxies[-1].address, wait=False))
                    for daemon in daemons:
                        swarm.wait_ready(daemon)
                    for delay in args.delays_ms:
                        for proxy in proxies:
                            proxy.delay = delay / 1000
                        with AutoDistributedModelForCausalLM.from_pretrained(
                                DEMO, initial_peers=swarm.initial_peers) as model:
                            run(model, next(iter(prompts.values())), 4, None)  # warm up connections and caches
                            for text, ids in prompts.items():
                                speed = {m: [] for m in methods}
                                ratio = {m: [] for m in methods}
                                accept = {m: [] for m in methods}
                                for r in range(args.rounds):
                                    order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
                                    outs = {}
                                    for method in order:  # each method in each place of the order in turn
                                        gc.collect()
                                        out, tps, rate = run(model, ids, args.new_tokens, methods[method])
                                        outs[method] = out
                                        speed[method].append(tps)
                                        if rate is not None:
                                            accept[method].append(rate)
                                    for method in methods:
                                        if outs[method] != outs["plain"]:
                                            raise AssertionError(f"{method} output differs from plain greedy")
                                        ratio[method].append(speed[method][-1] / speed["plain"][-1])
                                row = [nodes, delay, text, statistics.median(speed["plain"])]
                                for method in ("prompt-lookup", "draft"):
                                    row += [statistics.median(speed[method]), statistics.median(ratio[method]),
                                            statistics.median(accept[method])]
                                rows.append(row)
                                print(table(HEADERS, [row]).splitlines()[-1], flush=True)
                finally:
                    for proxy in proxies:
                        proxy.close()
    which = (f"the first {args.draft_blocks} of {num_layers} blocks" if args.draft_blocks is not None
             else str(args.draft))
    print(f"demo model, greedy, {args.new_tokens} new tokens, each node behind a proxy delaying each direction; "
          f"median of {args.rounds} paired rounds; draft: {which}")
    print(table(HEADERS, rows))


HEADERS = ["nodes", "delay ms/leg", "text", "plain tok/s", "lookup tok/s", "lookup speed-up", "lookup accept",
           "draft tok/s", "draft speed-up", "draft accept"]


if __name__ == "__main__":
    main()
