"""Our quantized products (homeswarm.model.kernels) against torch's kernels, at 1-8 rows.

    python bench/bench_kernels.py [--rounds 5] [--threads 0] [--rows 1,2,4,8] [--isa avx512|avx2|scalar]

Cases: int8 (symmetric per output channel, bfloat16 scales) and int4 (groups of 32; ours symmetric
with bfloat16 scales as Kimi K2's experts ship, torch's kernel asymmetric, the only form it has) on a
4096x4096 weight and Kimi K2's expert shapes (gate/up 2048x7168, down 7168x2048). torch's kernels:
``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu`` with bfloat16 activations (what
``model/quant.py`` runs), ours with float32 activations (what it hands them).

Every product reads a different copy of its weight, cycling through enough copies (768 MiB) that
none is in the CPU cache, as in a decoding step that reads each weight once. Each round measures the
read bandwidth (the best of 3 sums over a 1 GiB buffer, as bench/bench_bandwidth.py does), then
times ours and torch's, in alternating order; GB/s counts the weight bytes read (with scales) per
second; "of read" is that over the round's read bandwidth; the tables give medians over rounds, and
the speed-up is the median of the per-round ratios. The load average is printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from homeswarm.launch import configure_openmp  # noqa: E402

configure_openmp()  # as the node's console scripts do, before torch loads: threads sleep soon after a product

import torch  # noqa: E402

from bench.bench_bandwidth import GIB, read_bandwidth  # noqa: E402
from bench.common import table  # noqa: E402
from homeswarm.model import int4_pack, kernels  # noqa: E402

POOL_BYTES = 768 << 20
CASES = [  # (name, out features, in features, format)
    ("4096x4096", 4096, 4096, "int8"),
    ("4096x4096", 4096, 4096, "int4"),
    ("K2 gate/up 2048x7168", 2048, 7168, "int8"),
    ("K2 gate/up 2048x7168", 2048, 7168, "int4"),
    ("K2 down 7168x2048", 7168, 2048, "int8"),
    ("K2 down 7168x2048", 7168, 2048, "int4"),
]
GROUP = 32


def copies_of(make, nbytes: int) -> list:
    one = make()
    count = max(2, POOL_BYTES // nbytes)
    return [tuple(t.clone() for t in one) for _ in range(count)]


def setup(n: int, k: int, fmt: str):
    """(ours: list of argument tuples, torch's: list, bytes ours reads per product, bytes torch's reads)."""
    gen = torch.Generator().manual_seed(0)
    if fmt == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s = (torch.rand(n, generator=gen) / 64).bfloat16()
        nbytes = q.nbytes + s.nbytes
        ours = copies_of(lambda: (q, s), nbytes)
        return ours, ours, nbytes, nbytes
    v = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    s = (torch.rand(n, k // GROUP, 1, generator=gen) / 16).bfloat16()
    ours_bytes = v.numel() // 2 + s.nbytes
    ours = copies_of(lambda: (int4_pack.pack_plain(v), s), ours_bytes)
    packed = int4_pack.pack_for_kernel(v)
    sz = torch.stack((s[..., 0], torch.zeros_like(s[..., 0])), dim=-1).transpose(0, 1).contiguous()
    theirs_bytes = packed.nbytes + sz.nbytes
    theirs = copies_of(lambda: (packed, sz), theirs_bytes)
    return ours, theirs, ours_bytes, theirs_bytes


def time_pass(fn, x: torch.Tensor, pool: list) -> float:
    """Seconds per product: one pass over every copy."""
    start = time.perf_counter()
    for args in pool:
        fn(x, *args)
    return (time.perf_counter() - start) / len(pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--isa", choices=kernels.ISAS, default=None)
    parser.add_argument("--cases", default="", help="comma-separated case numbers (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit("the kernels' library is not built: run `make` first")
    isa = kernels.ISAS.index(args.isa) if args.isa else kernels.isa()
    rows = [int(r) for r in args.rows.split(",")]
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    buffer = torch.ones(GIB // 4)
    print(f"threads {torch.get_num_threads()}, ours on {kernels.ISAS[isa]}, load average {os.getloadavg()[0]:.2f}")
    out = []
    for name, n, k, fmt in cases:
        ours, theirs, ours_bytes, theirs_bytes = setup(n, k, fmt)
        if fmt == "int8":
            def run_ours(x, q, s):
                return kernels.qmm(x, [q], [s], 0, isa_index=isa)

            def run_theirs(x, q, s):
                return torch.ops.aten._weight_int8pack_mm(x, q, s)
        else:
            def run_ours(x, w, s):
                return kernels.qmm(x, [w], [s], GROUP, isa_index=isa)

            def run_theirs(x, w, sz):
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)
        for m in rows:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            got = {"ours": [], "torch": [], "read": [], "ratio": []}
            for r in range(args.rounds):
                bw = read_bandwidth(buffer)
                order = ["ours", "torch"] if r % 2 == 0 else ["torch", "ours"]
                t = {}
                for who in order:
                    if who == "ours":
                        t[who] = time_pass(run_ours, x, ours)
                    else:
                        t[who] = time_pass(run_theirs, xb, theirs)
                got["ours"].append(ours_bytes / t["ours"])
                got["torch"].append(theirs_bytes / t["torch"])
                got["read"].append(bw)
                got["ratio"].append(t["torch"] / t["ours"])
            med = {key: statistics.median(v) for key, v in got.items()}
            frac_ours = statistics.median(o / b for o, b in zip(got["ours"], got["read"], strict=True))
            frac_theirs = statistics.median(o / b for o, b in zip(got["torch"], got["read"], strict=True))
            out.append([name, fmt, m, f"{med['read'] / 1e9:.1f}", f"{med['ours'] / 1e9:.1f}", f"{frac_ours:.0%}",
                        f"{med['torch'] / 1e9:.1f}", f"{frac_theirs:.0%}", f"{med['ratio']:.2f}x"])
            print(" | ".join(str(c) for c in out[-1]), flush=True)
        del ours, theirs
    print()
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(table(["weight", "format", "rows", "read GB/s", "ours GB/s", "of read", "torch GB/s", "of read",
           "ours vs torch"], out))


if __name__ == "__main__":
    main()
