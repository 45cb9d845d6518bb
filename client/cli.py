"""The `homeswarm` command: generate through a swarm, chat with it, serve it over an OpenAI-compatible HTTP
API, show what a swarm serves, run a bootstrap DHT peer, run the demo.

Bad input (a missing folder, malformed prompt ids, out-of-range options) prints a message and
exits with code 2; a swarm that cannot serve the request (missing blocks, failed nodes) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from homeswarm.client.config import ClientConfig
from homeswarm.routing.preflight import (
    check_initial_peers,
    explain_dht_error,
    identity_problem,
    port_taken,
    split_peers_argv,
)

if TYPE_CHECKING:
    from homeswarm.client.tokenizer import TextCodec
    from homeswarm.model import ModelConfig

# Only light modules load at start: --help and bad arguments answer before torch, tokenizers and hivemind
# load (seconds); each command imports what it needs once its arguments are checked.

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class UsageError(Exception):
    pass


class JoinError(Exception):
    """The client could not join the swarm (unreachable or bad initial peers): exit code 1."""


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--prompt-ids is empty")
    return ids


def _stream_text(codec: TextCodec | None, ids: list[int], *, final: bool) -> str:
    """What may be shown so far. Byte-level tokenizers split characters across tokens, and the bytes
    of an unfinished character decode to U+FFFD until the last one arrives: hold those back."""
    if codec is None:
        return " ".join(map(str, ids))
    text = codec.decode(ids)
    return text if final else text.rstrip("\ufffd")


def _print_new_text(text: str, printed: str) -> str:
    """Write what ``text`` adds to what is already ``printed``; return what is printed now."""
    if not text.startswith(printed):
        return printed  # the decoder rewrote earlier text; wait until it extends what is shown again
    sys.stdout.write(text[len(printed):])
    sys.stdout.flush()
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homeswarm", description="Run large language models on a swarm of PCs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the client does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text through the swarm")
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder (config.json, head weights, tokenizer), "
                     "a Hugging Face repository id (owner/name): only those files are downloaded; or a GGUF file")
    gen.add_argument("--cache-dir", default=None, help="where a repository's files are downloaded (default: "
                     "huggingface_hub's cache, $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    gen.add_argument("--initial-peers", nargs="+", action="extend", required=True, metavar="MADDR",
                     help="any peer of the swarm (several: after one flag, comma-separated, or the flag repeated)")
    gen.add_argument("--model-name", help="name the nodes serve the model under (default: the folder's name, "
                     "the repository id, or a GGUF file's stem)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs tokenizer.json in MODEL_DIR)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    gen.add_argument("--chat", action="store_true", help="--prompt is a user's message: render it with the "
                     "checkpoint's chat template (as homeswarm chat and serve do) and generate the answer")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens only (default: all)")
    gen.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens whose "
                     "probabilities add up to P (nucleus sampling; default: all)")
    gen.add_argument("--seed", type=int, default=None, help="random seed of the sampling, for repeatable output "
                     "(default: a fresh one)")
    gen.add_argument("--compression", default="none", choices=["none", "float16", "bfloat16", "int8", "auto"],
                     help="compression of hidden states on the wire (default none: exact; auto picks per hop)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--speculative", default=None, metavar="prompt-lookup|draft:DIR",
                     help="speculative decoding: draft tokens locally (prompt lookup, or a small model with the same "
                     "tokenizer in DIR) and let the swarm check several per round trip; same output")
    gen.add_argument("--verify-fraction", type=float, default=0.0, metavar="F",
                     help="re-run this share (0..1) of steps on a second server of each span and compare; a node "
                     "caught returning wrong hidden states is banned and the step recomputed (default 0: off)")
    gen.add_argument("--trust", action="store_true",
                     help="the swarm's nodes are trusted (a private swarm): no mirror sessions, so nodes' answers are "
                     "not compared and a failed node's blocks are rebuilt by a replay (by default each hop gets a "
                     "mirror on a second server of its blocks, where one exists)")
    gen.add_argument("--step-timeout", type=float, default=ClientConfig.step_timeout, metavar="SECONDS",
                     help="seconds a step on one node may take beyond what its tokens take at the node's announced "
                     "speed before the client checks on the node; a node that still answers is waited for "
                     f"(default {ClientConfig.step_timeout:g})")
    gen.add_argument("--require-tls", action="store_true", help="use only nodes that serve over TLS (skip nodes "
                     "started with --insecure, which are otherwise used in plaintext)")
    gen.add_argument("--exact", action="store_true", help="route only through nodes serving the checkpoint's own "
                     "weights (not int8/int4 quantized ones); fails when only quantized nodes serve some blocks")
    gen.add_argument("--adapter", metavar="NAME", default="", help="run every block with this LoRA adapter (its "
                     "name as nodes serving it announce it, join-swarm --adapters), through those nodes only")
    # SUPPRESS: the subcommand's flag must not reset `homeswarm -v generate`
    gen.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="log what the client does, and print the route the generation used (nodes, blocks, "
                     "weight formats)")

    srv = sub.add_parser("serve", help="serve the model through the swarm over an OpenAI-compatible HTTP API")
    srv.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder (config.json, head weights, "
                     "tokenizer.json), a Hugging Face repository id (owner/name): only those files are downloaded; "
                     "or a GGUF file")
    srv.add_argument("--cache-dir", default=None, help="where a repository's files are downloaded (default: "
                     "huggingface_hub's cache)")
    srv.add_argument("--initial-peers", nargs="+", action="extend", required=True, metavar="MADDR",
                     help="any peer of the swarm (several: after one flag, comma-separated, or the flag repeated)")
    srv.add_argument("--model-name", help="name the nodes serve the model under, and the model id of the API "
                     "(default: the folder's name, or the repository id)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request "
                     "(default: $HOMESWARM_API_KEY when set, else no check)")
    srv.add_argument("--max-sessions", type=int, default=8,
                     help="requests generating at once, each with its own sessions; more wait (default 8)")
    srv.add_argument("--compression", default="none", choices=["none", "float16", "bfloat16", "int8", "auto"],
                     help="compression of hidden states on the wire (default none: exact)")
    srv.add_argument("--trust", action="store_true",
                     help="the swarm's nodes are trusted (a private swarm): no mirror sessions, so nodes' answers are "
                     "not compared and a failed node's blocks are rebuilt by a replay (by default each hop gets a "
                     "mirror on a second server of its blocks, where one exists)")
    srv.add_argument("--step-timeout", type=float, default=ClientConfig.step_timeout, metavar="SECONDS",
                     help="seconds a step on one node may take beyond what its tokens take at the node's announced "
                     "speed before the client checks on the node; a node that still answers is waited for "
                     f"(default {ClientConfig.step_timeout:g})")
    srv.add_argument("--default-max-tokens", type=int, default=512, metavar="N",
                     help="tokens a chat completion generates when the request sets neither max_tokens nor "
                     "max_completion_tokens (default 512, or what the context leaves); /v1/completions keeps "
                     "OpenAI's 16")
    srv.add_argument("--ready-file", default=None, help="write {address, url, model} here once serving")

    status = sub.add_parser("status", help="show what the swarm serves: per model its blocks, who serves them, "
                            "their state, throughput, free cache and weight format")
    status.add_argument("--initial-peers", nargs="+", action="extend", required=True, metavar="MADDR",
                     help="any peer of the swarm (several: after one flag, comma-separated, or the flag repeated)")
    status.add_argument("--model-name", action="append", default=None, metavar="NAME",
                        help="show only this model (repeatable; default: every model announced)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    dht = sub.add_parser("dht", help="run a bootstrap DHT peer (serves no model)")
    dht.add_argument("--host", default="127.0.0.1", help="address the DHT listens on (default 127.0.0.1: this "
                     "machine only; 0.0.0.0: every interface)")
    dht.add_argument("--port", type=int, default=0, help="TCP port the DHT listens on (default 0 picks a free one; "
                     "give one, with --identity, for an address that stays the same across restarts)")
    dht.add_argument("--ready-file", default=None, help="write {peer_id, dht_maddrs} here once up")
    dht.add_argument("--identity", default=None, metavar="PATH", help="file with the peer's private key, created on "
                     "first use: the peer id, and with a fixed --port the multiaddrs, stay the same across restarts "
                     "(default: a new peer id at every start)")
    dht.add_argument("--initial-peers", nargs="+", action="extend", default=[], metavar="MADDR",
                     help="join an existing swarm as one more bootstrap peer and relay (default: start one)")

    chat = sub.add_parser("chat", help="talk with an instruct model through the swarm (its chat template, the "
                          "conversation kept; /reset forgets it)")
    chat.add_argument("model_dir", metavar="MODEL", help="checkpoint folder with tokenizer.json and a chat template "
                      "(tokenizer_config.json or chat_template.jinja), a Hugging Face repository id (owner/name), "
                      "or a GGUF file")
    chat.add_argument("--cache-dir", default=None, help="where a repository's files are downloaded (default: "
                      "huggingface_hub's cache)")
    chat.add_argument("--initial-peers", nargs="+", action="extend", required=True, metavar="MADDR",
                      help="any peer of the swarm (several: after one flag, comma-separated, or the flag repeated)")
    chat.add_argument("--model-name", help="name the nodes serve the model under (default: the folder's name, or "
                      "the repository id)")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation "
                      "(kept by /reset)")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="most tokens of one reply (default 512; a reply "
                      "also ends at the model's end token)")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 is greedy (default 0.7)")
    chat.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens only (default: all)")
    chat.add_argument("--top-p", type=float, default=0.9, help="sample among the likeliest tokens whose "
                      "probabilities add up to P (default 0.9)")
    chat.add_argument("--seed", type=int, default=None, help="random seed of the sampling (default: a fresh one)")
    chat.set_defaults(compression="none")

    # listed for --help only: main() hands `homeswarm dashboard ...` to the dashboard's own command line
    sub.add_parser("dashboard", add_help=False, help="serve the swarm's health: a web page, a JSON API and "
                   "Prometheus metrics, with history (options: homeswarm dashboard --help)")

    demo = sub.add_parser("demo", help="start a local swarm with the demo model and generate text")
    demo.add_argument("--prompt", default="ROMEO:\n", help="text to continue (default: 'ROMEO:' and a newline)")
    demo.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate (default 120)")
    demo.add_argument("--nodes", type=int, default=3, help="join-swarm nodes to start, each serving a share of the "
                      "blocks (default 3)")
    demo.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 is greedy "
                      "(default 0.8)")
    demo.add_argument("--top-k", type=int, default=40, help="sample among the K likeliest tokens (default 40)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    demo.add_argument("--keep-running", action="store_true",
                      help="keep the swarm up after generating, so other nodes and clients can join; Ctrl-C stops it")
    return parser


def _model_dir(args: argparse.Namespace) -> Path:
    """MODEL_DIR, or for a repository id the snapshot folder its client files were downloaded to (the
    repository id is then the default model name)."""
    if args.model_dir.lower().endswith(".gguf"):  # a folder of its config and tokenizer; weights stay in the file
        if not Path(args.model_dir).is_file():
            raise UsageError(f"GGUF file not found: {args.model_dir}")  # before loading torch
        from homeswarm.model.gguf_files import gguf_folder
        from homeswarm.model.gguf_reader import model_stem

        try:
            folder = gguf_folder(args.model_dir)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
        args.model_name = args.model_name or model_stem(args.model_dir)
        return folder
    path = Path(args.model_dir)
    if not path.exists() and (not _REPO_ID.fullmatch(args.model_dir) or path.parent.exists()):
        raise UsageError(f"{args.model_dir} is not a checkpoint folder (no config.json)")  # before loading torch
    from homeswarm.model.hub import fetch_client_files, is_hub_id

    if not is_hub_id(args.model_dir):
        return path
    try:
        folder = fetch_client_files(args.model_dir, cache_dir=args.cache_dir)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    args.model_name = args.model_name or args.model_dir
    return folder


def _check_checkpoint(model_dir: Path, *, head_only: bool = True) -> ModelConfig:
    """Cheap checks of the checkpoint (config, weight names, the head's shards), so bad input fails before any
    network. ``head_only``: a client's folder needs only the shards of the head (not a draft model's)."""
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} is not a checkpoint folder (no config.json)")
    from homeswarm.client.peer_files import needs_peers as needs_peer_files
    from homeswarm.model import ModelConfig
    from homeswarm.model.checkpoint import block_of
    from homeswarm.model.gguf_files import is_gguf_folder, open_checkpoint

    try:
        config = ModelConfig.from_dir(model_dir)
        if head_only and not is_gguf_folder(model_dir) and needs_peer_files(model_dir):
            return config  # config.json without the head's tensors: they come from the swarm's nodes
        reader = open_checkpoint(model_dir)  # safetensors, or the GGUF file the folder stands for
        lacking = reader.missing_files(n for n in reader.names() if not head_only or block_of(n) is None)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if lacking:
        raise UsageError(f"{model_dir} lacks {', '.join(lacking)}, shard file(s) with "
                         f"{'the embeddings, final norm or LM head' if head_only else 'weights'} this needs")
    return config


def _check_speculative(spec: str, vocab: int) -> None:
    if spec == "prompt-lookup":
        return
    if not spec.startswith("draft:") or spec == "draft:":
        raise UsageError(f"--speculative takes prompt-lookup or draft:DIR, got {spec!r}")
    draft_vocab = _check_checkpoint(Path(spec[len("draft:"):]), head_only=False).vocab_size
    if draft_vocab != vocab:
        raise UsageError(f"the draft model's vocabulary has {draft_vocab} tokens, the model's {vocab}: "
                         "they must share the tokenizer")


def _check_peers(peers: Sequence[str]) -> None:
    if (bad := check_initial_peers(peers)) is not None:
        raise UsageError(bad)


def _join(model_dir: Path, args: argparse.Namespace):  # noqa: ANN202 - the client class loads lazily
    from homeswarm.client.model import AutoDistributedModelForCausalLM
    from homeswarm.client.peer_files import NoPeerFiles, PeerFilesError
    from homeswarm.model import MissingTensorsError
    from homeswarm.model.checkpoint import MissingShardsError

    step_timeout = getattr(args, "step_timeout", ClientConfig.step_timeout)
    if not step_timeout > 0:
        raise UsageError(f"--step-timeout must be positive, got {step_timeout:g}")
    adapter = getattr(args, "adapter", "")
    if adapter:
        from homeswarm.routing.records import ADAPTER_NAME_RE

        if not ADAPTER_NAME_RE.fullmatch(adapter):
            raise UsageError(f"--adapter must be an adapter's name: 1-64 letters, digits, '.', '_' or '-' "
                             f"(starting with a letter or digit), got {adapter!r}")
    try:
        return AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=args.initial_peers, model_name=args.model_name,
            config=ClientConfig(compression=args.compression, exact=getattr(args, "exact", False),
                                verify_fraction=getattr(args, "verify_fraction", 0.0),
                                require_tls=getattr(args, "require_tls", False), step_timeout=step_timeout,
                                mirrors=not getattr(args, "trust", False), adapter=adapter),
        )
    except (MissingTensorsError, MissingShardsError) as e:
        raise UsageError(str(e)) from None
    except NoPeerFiles as e:  # a folder without the head, and no node offers it: bad input, most likely
        raise UsageError(str(e)) from None
    except PeerFilesError as e:  # the head or tokenizer to fetch from the swarm's nodes: none could give it
        raise JoinError(str(e)) from None
    except Exception as e:  # hivemind raises several types for unreachable or malformed peers
        raise JoinError(_join_failure(e, args.initial_peers)) from None


def _join_failure(error: Exception, peers: Sequence[str]) -> str:
    return f"could not join the swarm through --initial-peers: {explain_dht_error(error, peers, '127.0.0.1', 0)}"


def _chat_prompt_ids(model_dir: Path, codec: TextCodec, message: str) -> list[int]:
    """``message`` as a user's turn in the checkpoint's chat template, with the assistant's turn opened."""
    from homeswarm.client.chat_template import ChatTemplate, ChatTemplateError

    try:
        template = ChatTemplate.for_model(model_dir)
        if template is None:
            raise UsageError(f"{model_dir} has no chat template (tokenizer_config.json's chat_template, or "
                             "chat_template.jinja): --chat needs one")
        text = template.render([{"role": "user", "content": message}])
    except (ChatTemplateError, ValueError, OSError) as e:
        raise UsageError(f"{model_dir}: {e}") from None
    return codec.encode(text, add_special_tokens=False)  # the template wrote them


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if not 0 <= args.verify_fraction <= 1:
        raise UsageError("--verify-fraction must be in [0, 1]")
    if args.chat and args.prompt is None:
        raise UsageError("--chat needs --prompt TEXT (the user's message)")
    _check_peers(args.initial_peers)
    model_dir = _model_dir(args)
    vocab = _check_checkpoint(model_dir).vocab_size
    from homeswarm.client.speculative import MAX_DRAFT
    from homeswarm.client.tokenizer import TextCodec

    if args.speculative is not None:
        _check_speculative(args.speculative, vocab)
    codec = TextCodec.for_model(model_dir)
    if args.prompt is not None:
        if codec is None:
            raise UsageError(f"{model_dir} has no tokenizer.json: give --prompt-ids instead of --prompt")
        ids = _chat_prompt_ids(model_dir, codec, args.prompt) if args.chat else codec.encode(args.prompt)
        if not ids:
            raise UsageError("the prompt encodes to no tokens")
    else:
        ids = _parse_ids(args.prompt_ids)
    if any(not 0 <= i < vocab for i in ids):
        raise UsageError(f"prompt ids must be in 0..{vocab - 1}")

    model = _join(model_dir, args)
    session = None
    try:
        new_ids: list[int] = []
        printed = ""
        t0 = time.perf_counter()
        first_token_s = None
        # a session of our own, to tell which route the generation used
        room = MAX_DRAFT if args.speculative is not None else 0  # drafts checked beyond the output
        session = model.inference_session(max_length=len(ids) + args.max_new_tokens + room, batch_size=1)
        for tokens in model.generate_stream(
            [ids], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else 1.0,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, session=session, speculative=args.speculative,
        ):
            if first_token_s is None:
                first_token_s = time.perf_counter() - t0
            new_ids.append(int(tokens[0]))
            if not args.json:
                printed = _print_new_text(_stream_text(codec, new_ids, final=False), printed)
        seconds = time.perf_counter() - t0
        if not args.json:
            _print_new_text(_stream_text(codec, new_ids, final=True), printed)
        text = codec.decode(new_ids) if codec else ""
        decode_s = seconds - (first_token_s or 0.0)
        tokens_per_s = (len(new_ids) - 1) / decode_s if len(new_ids) > 1 and decode_s > 0 else 0.0
        route = [{"peer_id": hop.peer_id, "address": hop.address, "blocks": [hop.start, hop.end],
                  "quant": hop.server.quant, "dtype": hop.server.dtype} for hop in session.hops]
        if args.json:
            out = {"token_ids": new_ids, "text": text, "seconds": seconds, "tokens_per_s": tokens_per_s}
            if model.last_speculation is not None:
                out["acceptance_rate"] = model.last_speculation.acceptance_rate
            print(json.dumps({**out, "route": route} if args.verbose else out))
        else:
            sys.stdout.write("\n")
            print(f"[{len(new_ids)} tokens in {seconds:.2f} s, {tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        if args.verbose:
            failed = f" (after {session.failovers} node failure(s))" if session.failovers else ""
            print(f"route{failed}:", file=sys.stderr)
            for hop in route:
                from homeswarm.protocol.block_range import block_range  # not at the top: protocol loads torch

                weights = hop["dtype"] if hop["quant"] == "none" else f"{hop['quant']}, {hop['dtype']}"
                print(f"  blocks {block_range(*hop['blocks'])}: {hop['address']} "
                      f"(peer {hop['peer_id']}, weights {weights})", file=sys.stderr)
    finally:
        if session is not None:
            session.close()
        model.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_sessions < 1:
        raise UsageError("--max-sessions must be at least 1")
    if args.default_max_tokens < 1:
        raise UsageError(f"--default-max-tokens must be at least 1, got {args.default_max_tokens}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("HOMESWARM_API_KEY") or None
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise UsageError("--api-key must not be empty nor start or end with spaces")
    _check_peers(args.initial_peers)
    model_dir = _model_dir(args)
    config = _check_checkpoint(model_dir)
    from homeswarm.client.chat_template import ChatTemplate, ChatTemplateError
    from homeswarm.client.tokenizer import TextCodec

    codec = TextCodec.for_model(model_dir)
    if codec is None:
        raise UsageError(f"{model_dir} has no tokenizer.json: the HTTP API needs it to read and write text")
    try:
        template = ChatTemplate.for_model(model_dir)
    except (ChatTemplateError, ValueError, OSError) as e:
        raise UsageError(f"{model_dir}: {e}") from None

    from homeswarm.client.openai_api.app import ServedModel, create_app
    from homeswarm.client.openai_api.engine import SwarmEngine
    from homeswarm.client.openai_api.server import bind, serve

    try:
        sock = bind(args.host, args.port)  # before joining the swarm: a taken port fails at once
    except OSError as e:
        raise UsageError(f"could not listen on {args.host}:{args.port}: {e}") from None
    try:
        model = _join(model_dir, args)
        engine = SwarmEngine(model, codec, max_sessions=args.max_sessions)
        try:
            served = ServedModel(id=model.model_name, context_length=config.max_position_embeddings,
                                 vocab_size=config.vocab_size, chat_template=template, created=int(time.time()),
                                 default_max_tokens=args.default_max_tokens)
            app = create_app(engine, served, api_key=api_key)
            host, port = sock.getsockname()[:2]
            print(f"serving {served.id!r} with the OpenAI API at http://{host}:{port}/v1"
                  + ("" if template else " (no chat template: /v1/chat/completions answers 400)"),
                  file=sys.stderr, flush=True)
            # uvicorn restores these handlers after it stops and re-raises the signal it caught: with the
            # default handlers that would kill us before the sessions and the DHT are closed
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            serve(app, engine, sock, ready_file=args.ready_file, ready_info={"model": served.id},
                  verbose=args.verbose)
        finally:
            engine.close()
            model.close()
    finally:
        sock.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    _check_peers(args.initial_peers)
    model_dir = _model_dir(args)
    config = _check_checkpoint(model_dir)
    from homeswarm.client.chat import Conversation, read_lines, run_chat
    from homeswarm.client.chat_template import ChatTemplate, ChatTemplateError
    from homeswarm.client.tokenizer import TextCodec

    codec = TextCodec.for_model(model_dir)
    if codec is None:
        raise UsageError(f"{model_dir} has no tokenizer.json: a chat needs it to read and write text")
    try:
        template = ChatTemplate.for_model(model_dir)
    except (ChatTemplateError, ValueError, OSError) as e:
        raise UsageError(f"{model_dir}: {e}") from None
    if template is None:
        raise UsageError(f"{model_dir} has no chat template (tokenizer_config.json's chat_template, or "
                         "chat_template.jinja): use homeswarm generate --prompt")
    conversation = Conversation(template, system=args.system)
    try:
        conversation.prompt("hello")
    except ChatTemplateError as e:
        raise UsageError(f"{model_dir}: {e}") from None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    model = _join(model_dir, args)
    try:
        return run_chat(model, codec, conversation, read_lines(), context_length=config.max_position_embeddings,
                        max_new_tokens=args.max_new_tokens, say=lambda text: print(text, file=sys.stderr, flush=True),
                        write=write, do_sample=args.temperature > 0,
                        temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    finally:
        model.close()


def cmd_status(args: argparse.Namespace) -> int:
    _check_peers(args.initial_peers)
    from homeswarm.client.status import format_report, swarm_report
    from homeswarm.routing.dht import SwarmDHT

    try:
        dht = SwarmDHT.create(args.initial_peers, client_mode=True)
    except Exception as e:  # hivemind raises several types for unreachable or malformed peers
        raise JoinError(_join_failure(e, args.initial_peers)) from None
    try:
        models = dht.list_models()
        if args.model_name:
            models = {name: models.get(name, 0) for name in args.model_name}
        records = {name: dht.get_servers(name, 0, total) for name, total in models.items() if total > 0}
    finally:
        dht.shutdown()
    report = swarm_report(models, records)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_dht(args: argparse.Namespace) -> int:
    _check_peers(args.initial_peers)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if (taken := port_taken(args.host, args.port)) is not None:  # p2pd would share it silently
        raise UsageError(f"--port {args.port}: {taken}")
    if args.identity is not None and (problem := identity_problem(args.identity)) is not None:
        raise UsageError(problem)
    from homeswarm.protocol.ready_file import write_ready_file
    from homeswarm.routing.dht import SwarmDHT

    key = None
    if args.identity is not None:  # the same peer id, so the same multiaddrs with a fixed --port, at every start
        from homeswarm.routing.signing import NodeKey

        try:
            key = NodeKey.load_or_create(args.identity)
        except (OSError, ValueError) as e:
            raise UsageError(f"--identity: {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        dht = SwarmDHT.create(args.initial_peers, host=args.host, port=args.port, relay_service=True, key=key)
    except Exception as e:
        raise UsageError(f"could not start the DHT on {args.host}:{args.port}: "
                         + explain_dht_error(e, args.initial_peers, args.host, args.port)) from None
    try:
        from homeswarm.routing.relay import serve_reachability_checks

        serve_reachability_checks(dht)  # its p2pd also relays for nodes that cannot be dialled
        maddrs = dht.visible_maddrs()
        if args.ready_file:
            write_ready_file(args.ready_file, {"peer_id": dht.peer_id, "dht_maddrs": maddrs})
        print("bootstrap peer up; join with --initial-peers " + " ".join(maddrs), file=sys.stderr, flush=True)
        stop.wait()
    finally:
        dht.shutdown()
    return 0


def run_dashboard(argv: Sequence[str]) -> None:
    """Replace this process with the dashboard's (client code never imports the dashboard)."""
    os.execv(sys.executable, [sys.executable, "-m", "homeswarm.dashboard", *argv])


def _swarm_failure(error: Exception) -> bool:
    """Whether ``error`` says the swarm could not serve the request (exit code 1, one line). The classes load
    here, where the request ran (and so loaded them), not at start."""
    from homeswarm.client.session import SessionError
    from homeswarm.routing.planner import MissingBlocksError

    return isinstance(error, (MissingBlocksError, SessionError))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv[:2] if a in ("-v", "--verbose")]
    if argv[len(flags):len(flags) + 1] == ["dashboard"]:
        run_dashboard([*argv[len(flags) + 1:], *(["--verbose"] if flags else [])])
    parser = build_parser()
    args = parser.parse_args(split_peers_argv(argv))  # a model's folder may follow --initial-peers MADDR ...
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    try:
        if args.command == "generate":
            code = cmd_generate(args)
        elif args.command == "serve":
            code = cmd_serve(args)
        elif args.command == "dht":
            code = cmd_dht(args)
        elif args.command == "status":
            code = cmd_status(args)
        elif args.command == "chat":
            code = cmd_chat(args)
        else:
            from homeswarm.client.demo import run_demo

            code = run_demo(args)
    except UsageError as e:
        print(f"homeswarm: error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except (JoinError, TimeoutError) as e:  # TimeoutError: a DHT call
        print(f"homeswarm: error: {e}", file=sys.stderr)
        code = EXIT_FAILED
    except Exception as e:
        if not _swarm_failure(e):
            raise
        print(f"homeswarm: error: {e}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
