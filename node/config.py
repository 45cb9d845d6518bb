"""NodeConfig: every setting of the join-swarm daemon, each with its help text; the CLI is built from it.

The flags follow the interface contract in DESIGN.md. ``NodeConfig.from_args`` is the only place that
turns command-line strings into a validated config; bad values raise ``ConfigError`` whose message
the CLI prints before exiting with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from homeswarm.node.capacity import DEFAULT_CACHE_SHARE, parse_size
from homeswarm.routing.preflight import check_initial_peers, split_peers_argv
from homeswarm.routing.records import ADAPTER_NAME_RE, is_valid_address

# homeswarm.model.quant's choices (a test holds them equal): importing it would load torch, and the
# command line must answer --help and refuse bad input without that (it takes seconds)
QUANT_FORMATS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 32
DEFAULT_IMBALANCE = 0.2  # homeswarm.routing.block_chooser's (which loads numpy): a test holds them equal


# --help lists the options in these groups (a setting in none of them goes under "other options")
HELP_GROUPS = {
    "the swarm and the network": ("new_swarm", "initial_peers", "host", "port", "dht_port", "public_address",
                                  "reachability", "identity", "insecure", "public_name", "ready_file",
                                  "metrics_port"),
    "the model": ("model_name", "cache_dir", "dtype", "device", "quant", "quant_group_size", "adapters",
                  "upload_limit"),
    "blocks and memory": ("blocks", "num_blocks", "max_memory", "fixed_cost", "max_cache_tokens", "cache_share",
                          "rebalance_interval", "rebalance_imbalance"),
    "serving only while the PC is idle": ("idle_only", "idle_cpu_busy", "idle_users", "idle_input_after",
                                          "busy_after", "idle_after", "idle_check_interval", "busy_grace",
                                          "serve_on_battery"),
    "compute": ("max_threads", "compute_threads", "throughput", "max_batch_size", "batch_wait_ms",
                "inline_compute_ms"),
    "sessions and limits": ("max_session_length", "session_idle_timeout", "max_sessions_per_peer",
                            "max_requests_per_peer", "shutdown_grace", "announce_ttl"),
}


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def _opt(default, help: str, **argparse_kwargs):  # noqa: ANN001, A002
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class NodeConfig:
    model_dir: str = field(metadata={"help": "checkpoint folder (config.json, the safetensors index and the shards of "
                                     "the blocks served), or a Hugging Face repository id (owner/name): its config "
                                     "and index are downloaded, then only the shards of the blocks chosen; or a GGUF "
                                     "file (FILE.gguf, or a split's NAME-00001-of-0000N.gguf)",
                                     "positional": True})
    model_name: str | None = _opt(None, "name nodes and clients meet under (default: the folder's name, the "
                                  "repository id, or a GGUF file's stem)")
    cache_dir: str | None = _opt(None, "where a repository's files are downloaded (default: huggingface_hub's cache, "
                                 "$HF_HUB_CACHE or ~/.cache/huggingface/hub), and blocks fetched from peers are "
                                 "kept, under peer-weights/ (default: ~/.cache/homeswarm)")
    upload_limit: str = _opt("20MB", "bytes per second this node sends, all together, to peers fetching its blocks' "
                             "weights from it, e.g. 20MB, 500KB (0: no uploads); uploads wait while compute has "
                             "steps queued")
    blocks: str | None = _opt(None, "serve blocks A..B-1, written A:B")
    num_blocks: int | None = _opt(None, "serve N blocks, chosen where the swarm is weakest (default: as many as "
                                  "fit --max-memory)")
    new_swarm: bool = _opt(False, "start a new swarm instead of joining one")
    initial_peers: tuple[str, ...] = _opt((), "multiaddrs of peers already in the swarm (several after one flag, "
                                          "comma-separated, or the flag repeated)", nargs="+", action="extend")
    host: str = _opt("127.0.0.1", "address the gRPC service binds to")
    port: int = _opt(0, "gRPC port (0 picks a free port)")
    dht_port: int = _opt(0, "DHT (libp2p) port (0 picks a free port)")
    public_address: str | None = _opt(None, "HOST:PORT announced to the swarm, when it differs from the bind address")
    reachability: str = _opt("auto", "how others reach the gRPC service: auto (ask peers to dial it back; if none "
                             "can, relayed), direct (dial --public-address or the bind address), relayed "
                             "(through libp2p relays: the --initial-peers)", choices=["auto", "direct", "relayed"])
    dtype: str = _opt("float32", "compute and weight dtype", choices=["float32", "bfloat16", "float16"])
    device: str = _opt("cpu", "torch device for the blocks (cpu, cuda, cuda:1, ...)")
    adapters: tuple[str, ...] = _opt((), "LoRA adapter folders as peft's save_pretrained writes them "
                                     "(adapter_config.json, adapter_model.safetensors), served beside the base "
                                     "weights to clients that name one; an adapter's name is its folder's name",
                                     nargs="+", action="extend", metavar="DIR")
    quant: str = _opt("none", "weight format of the blocks' linear layers and experts, quantized at load: none "
                      "(the checkpoint's weights, exact), int8 (per output channel, 0.25x float32's bytes), int4 "
                      "(per group of inputs, 0.13-0.16x); on a checkpoint shipped 4-bit, the layers it ships in float; "
                      "announced to the swarm", choices=list(QUANT_FORMATS))
    quant_group_size: int = _opt(DEFAULT_INT4_GROUP_SIZE, "inputs per int4 scale and zero point (smaller: more "
                                 "accurate, more bytes)", choices=list(INT4_GROUP_SIZES))
    public_name: str = _opt("", "a name shown on the swarm dashboard")
    insecure: bool = _opt(False, "serve gRPC in plaintext, without TLS (for benchmarks and trusted networks; "
                          "clients with --require-tls skip this node)")
    ready_file: str | None = _opt(None, "once serving, write a JSON object about this node here (atomically)")
    identity: str | None = _opt(None, "file with the node's private key, created on first use: the node keeps "
                                "its peer id, and so its DHT address (with a fixed --dht-port), across restarts "
                                "(default: a new key at every start)")
    max_cache_tokens: int | None = _opt(
        None, "KV cache limit, in tokens of batch size 1 (default: --cache-share of the memory budget)"
    )
    max_memory: str | None = _opt(None, "memory the whole node may take, as the system counts it (the resident "
                                  "memory of this process, its DHT process and p2pd): runtime, the blocks' "
                                  "weights and the KV cache, with a unit: 4GiB, 500MB, 4G (default: half the memory available "
                                  "at start; on a GPU, 90%% of its free memory for weights and cache)")
    fixed_cost: str | None = _opt(None, "the memory the node's runtime takes besides weights and KV cache, counted "
                                  "against --max-memory; 0 counts weights and cache alone (default: measured at start, once the DHT "
                                  "runs, plus working memory for the largest step)")
    cache_share: float = _opt(DEFAULT_CACHE_SHARE, "share of the memory budget (--max-memory or its default, less "
                              "the runtime) the KV cache may use, when --max-cache-tokens is not given; the "
                              "weights get at most the rest")
    max_threads: int = _opt(0, "at most this many threads compute, torch's inter-op threads included (0: torch's "
                            "default); caps --compute-threads")
    throughput: float | None = _opt(None, "announce this many steps per second through one block instead of "
                                    "the self-test's (default: the self-test, cached per model, blocks, dtype, "
                                    "weight format and device)")
    idle_only: bool = _opt(False, "serve only while the machine is otherwise idle: step aside (announce busy, "
                           "end sessions after --busy-grace, free the memory) when its owner uses it")
    idle_cpu_busy: float = _opt(0.5, "with --idle-only: the share of all CPU cores other processes may use "
                                "before the owner counts as working")
    idle_users: tuple[str, ...] = _opt((), "with --idle-only: count only these users' processes (names or "
                                       "uids) as the owner's (default: every process but the node's)", nargs="+")
    idle_input_after: float = _opt(300.0, "with --idle-only: seconds without keyboard or mouse input before "
                                   "the owner counts as away (0: ignore input)")
    busy_after: float = _opt(10.0, "with --idle-only: seconds a CPU load must last before the node steps aside "
                             "(input and battery power act at once)")
    idle_after: float = _opt(60.0, "with --idle-only: seconds the owner must be away before the node serves again")
    idle_check_interval: float = _opt(2.0, "with --idle-only: seconds between measurements of the machine's use")
    busy_grace: float = _opt(10.0, "with --idle-only: seconds open sessions get when the owner comes back "
                             "(their clients then go on with other nodes)")
    serve_on_battery: bool = _opt(False, "with --idle-only: serve on battery power too")
    rebalance_interval: float = _opt(300.0, "without --blocks: seconds between checks whether moving to other "
                                     "blocks would strengthen the swarm's weakest ones (0: never move)")
    rebalance_imbalance: float = _opt(DEFAULT_IMBALANCE, "move only to lift blocks whose throughput is this "
                                      "fraction below the average block's")
    max_batch_size: int = _opt(16, "largest batch a session may open")
    max_session_length: int = _opt(8192, "most tokens one session may hold")
    session_idle_timeout: float = _opt(300.0, "close a session after this many seconds without a step")
    max_sessions_per_peer: int = _opt(64, "sessions one remote host may hold open here at once (0: no limit)")
    max_requests_per_peer: float = _opt(1000.0, "calls per second one remote host may make here, in bursts of "
                                        "twice that (0: no limit); steps of an open session do not count")
    shutdown_grace: float = _opt(10.0, "on SIGTERM/SIGINT, seconds open sessions get to finish")
    announce_ttl: float = _opt(30.0, "seconds an announcement lives; refreshed every third of that")
    compute_threads: int = _opt(0, "torch's intra-op threads, set exactly (0: torch's default, one per core); "
                                "--max-threads, when given too, caps it")
    batch_wait_ms: float = _opt(
        5.0, "hold a batch back up to this many ms for the next steps of sessions that were in the last one "
        "(their answers left together; their next steps come back staggered) (0: never wait)"
    )
    inline_compute_ms: float = _opt(
        5.0, "with a single session open, run its steps that took under this many ms on the event loop "
        "instead of the compute thread, saving two thread hand-offs (0: never)"
    )
    metrics_port: int | None = _opt(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics on the gRPC bind address (0 picks a free port)"
    )

    def validate(self) -> NodeConfig:
        if self.new_swarm == bool(self.initial_peers):
            raise ConfigError("give exactly one of --new-swarm or --initial-peers MADDR [MADDR ...]")
        if (bad_peer := check_initial_peers(self.initial_peers)) is not None:
            raise ConfigError(bad_peer)
        if self.blocks is not None and self.num_blocks is not None:
            raise ConfigError("give at most one of --blocks A:B and --num-blocks N")
        if self.blocks is not None:
            self.block_range()
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-blocks must be at least 1, got {self.num_blocks}")
        if not 0 <= self.port < 65536 or not 0 <= self.dht_port < 65536:
            raise ConfigError("ports must be in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.public_address is not None and not is_valid_address(self.public_address):
            raise ConfigError(f"--public-address must be HOST:PORT with a port in 1..65535, got {self.public_address!r}")
        if self.reachability not in ("auto", "direct", "relayed"):
            raise ConfigError(f"--reachability must be auto, direct or relayed, got {self.reachability!r}")
        if self.reachability == "relayed" and not self.initial_peers:
            raise ConfigError("--reachability relayed needs --initial-peers: they serve as the node's relays")
        names = [Path(folder).name for folder in self.adapters]
        for name in names:
            if not ADAPTER_NAME_RE.fullmatch(name):
                raise ConfigError(f"--adapters: an adapter's name is its folder's name, which must be 1-64 letters, "
                                  f"digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"--adapters: two folders have the same name ({', '.join(names)}); names must differ")
        if self.quant not in QUANT_FORMATS:
            raise ConfigError(f"--quant must be one of {', '.join(QUANT_FORMATS)}, got {self.quant!r}")
        if self.quant_group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"--quant-group-size must be one of {INT4_GROUP_SIZES}, got {self.quant_group_size}")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise ConfigError("--max-cache-tokens must be positive")
        for name in ("inline_compute_ms", "batch_wait_ms", "max_sessions_per_peer", "max_requests_per_peer"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)}")
        for name in ("max_batch_size", "max_session_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("session_idle_timeout", "shutdown_grace", "announce_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        self._validate_volunteer()
        return self

    def upload_rate(self) -> float:
        """--upload-limit in bytes per second (0: no uploads)."""
        if self.upload_limit.strip() == "0":
            return 0.0
        try:
            return float(parse_size(self.upload_limit))
        except ValueError as e:
            raise ConfigError(f"--upload-limit: {e}") from None

    def _validate_volunteer(self) -> None:
        self.upload_rate()
        for name in ("max_memory", "fixed_cost"):
            if getattr(self, name) is not None and (name, getattr(self, name).strip()) != ("fixed_cost", "0"):
                try:
                    parse_size(getattr(self, name))
                except ValueError as e:
                    raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
        if not 0 < self.cache_share < 1:
            raise ConfigError(f"--cache-share must be between 0 and 1, got {self.cache_share}")
        if self.max_threads < 0:
            raise ConfigError(f"--max-threads must be >= 0, got {self.max_threads}")
        if self.throughput is not None and not 0 < self.throughput < float("inf"):
            raise ConfigError(f"--throughput must be a positive number, got {self.throughput}")
        if not 0 < self.idle_cpu_busy <= 1:
            raise ConfigError(f"--idle-cpu-busy must be in (0, 1], got {self.idle_cpu_busy}")
        for name in ("idle_input_after", "busy_after", "idle_after", "busy_grace", "rebalance_interval"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)}")
        if not 0 <= self.rebalance_imbalance < 1:
            raise ConfigError(f"--rebalance-imbalance must be in [0, 1), got {self.rebalance_imbalance}")
        if not 0 < self.idle_check_interval < float("inf"):
            raise ConfigError(f"--idle-check-interval must be positive, got {self.idle_check_interval}")

    def block_range(self) -> tuple[int, int] | None:
        if self.blocks is None:
            return None
        try:
            a, b = (int(x) for x in self.blocks.split(":"))
        except ValueError:
            raise ConfigError(f"--blocks must be A:B (two integers), got {self.blocks!r}") from None
        if not 0 <= a < b:
            raise ConfigError(f"--blocks A:B needs 0 <= A < B, got {self.blocks!r}")
        return a, b

    @classmethod
    def parser(cls, prog: str = "join-swarm") -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=prog, description="Serve a slice of a model's Transformer blocks to a homeswarm swarm."
        )
        groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}
        group_of = {name: groups[title] for title, names in HELP_GROUPS.items() for name in names}
        other = parser.add_argument_group("other options")
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if meta.pop("positional", False):
                parser.add_argument(f.name, metavar=f.name.upper(), help=help_text)
                continue
            group = group_of.get(f.name, other)
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                group.add_argument(flag, action="store_true", help=help_text)
                continue
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(str(f.type), str)
            default_text = "" if f.default in (None, (), "") else f" (default: {f.default})"
            # None for a tuple: argparse's "extend" adds to a list (from_args makes it a tuple again)
            default = None if f.default == () else f.default
            group.add_argument(flag, type=kind, default=default, help=help_text + default_text, **meta)
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> NodeConfig:
        argv = split_peers_argv(sys.argv[1:] if argv is None else argv)  # MODEL_DIR may follow the peers
        args = vars(cls.parser().parse_args(argv))
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, value in args.items():
            if isinstance(value, list):  # nargs="+" flags: tuples, as the frozen config holds them
                args[name] = tuple(value)
            elif value is None and defaults[name] == ():
                args[name] = ()
        return cls(**args).validate()
