"""Two builds of our quantized kernels against each other, paired: this tree's and another revision's.

    python bench/bench_kernels_ab.py --old-rev HEAD [--rounds 5] [--threads 1] [--rows 1,2,4,8] [--cases 1,3,5]
    python bench/bench_kernels_ab.py --old-lib PATH.so ...

A change to ``model/kernels/`` is measured against the code it replaces on the same machine in the same
minutes: ``--old-rev`` checks that revision's ``model/kernels/`` out into a temporary folder and builds
it there (its own ``build.py``), or ``--old-lib`` names a library built already. Both libraries register
the same torch operators, so each runs in its own worker process (started once, holding its copies of
the weights); the two are driven in turns, alternating which goes first round by round, and the table
gives each one's GB/s (weight bytes with scales, per second) and the median of the per-round ratios
new/old. Cases are bench/bench_kernels.py's shapes and formats (int4: symmetric groups of 32, bfloat16
scales, as Kimi K2's experts ship). Each product reads another copy of its weight (``--pool-mib`` of
copies, default 256: none in the cache), or with ``--cached`` one copy again and again (what the
arithmetic alone allows). The machine's load average is printed: it is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [  # (name, out features, in features, format): bench/bench_kernels.py's
    ("4096x4096", 4096, 4096, "int8"),
    ("4096x4096", 4096, 4096, "int4"),
    ("K2 gate/up 2048x7168", 2048, 7168, "int8"),
    ("K2 gate/up 2048x7168", 2048, 7168, "int4"),
    ("K2 down 7168x2048", 7168, 2048, "int8"),
    ("K2 down 7168x2048", 7168, 2048, "int4"),
]
GROUP = 32
KERNEL_FILES = ("build.py", "ops.cpp", "qmm.h", "qmm_ref.h", "qmm_scalar.cpp", "qmm_avx2.cpp", "qmm_avx512.cpp")


def build_revision(rev: str, into: Path) -> Path:
    """``rev``'s model/kernels/ written into ``into`` and built there by its own build.py; the library's path."""
    for name in KERNEL_FILES:
        text = subprocess.run(["git", "show", f"{rev}:model/kernels/{name}"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        (into / name).write_bytes(text)
    subprocess.run([sys.executable, str(into / "build.py")], check=True, cwd=into)
    libs = list((into / "_build").glob("libhomeswarm_kernels-*.so"))
    if len(libs) != 1:
        sys.exit(f"building {rev}'s kernels left {len(libs)} libraries")
    return libs[0]


def worker(lib: str, threads: int, pool_bytes: int, cached: bool) -> None:
    """Load ``lib``; for each line ``case rows`` on stdin, time one pass over the case's weight copies and
    print the seconds per product."""
    from homeswarm.launch import configure_openmp

    configure_openmp()
    import torch

    torch.set_num_threads(threads)
    torch.ops.load_library(lib)
    isa = int(torch.ops.homeswarm.best_isa())
    pools: dict[int, list] = {}
    for line in sys.stdin:
        case, rows = (int(v) for v in line.split())
        _, n, k, fmt = CASES[case]
        if case not in pools:
            gen = torch.Generator().manual_seed(0)
            if fmt == "int8":
                one = (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
                       (torch.rand(n, generator=gen) / 64).bfloat16())
            else:
                v = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
                one = ((v[:, 0::2] | (v[:, 1::2] << 4)).contiguous(),
                       (torch.rand(n, k // GROUP, 1, generator=gen) / 16).bfloat16())
            nbytes = sum(t.nbytes for t in one)
            count = 64 if cached else max(2, pool_bytes // nbytes)
            pools[case] = [one] * count if cached else [tuple(t.clone() for t in one) for _ in range(count)]
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        index, offsets = torch.arange(rows), torch.tensor([0, rows])
        group = 0 if fmt == "int8" else GROUP
        pool = pools[case]
        torch.ops.homeswarm.qmm(x, list(pool[0][:1]), list(pool[0][1:]), index, offsets, group, isa)  # warm
        start = time.perf_counter()
        for w, s in pool:
            torch.ops.homeswarm.qmm(x, [w], [s], index, offsets, group, isa)
        seconds = (time.perf_counter() - start) / len(pool)
        print(json.dumps({"seconds": seconds, "bytes": sum(t.nbytes for t in pool[0])}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", help="a git revision whose kernels to build and compare against")
    parser.add_argument("--old-lib", help="a library built already, to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--cases", default="1,3,5", help="case numbers (bench/bench_kernels.py's; default: int4)")
    parser.add_argument("--pool-mib", type=int, default=256)
    parser.add_argument("--cached", action="store_true", help="one copy of each weight: in the cache")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.pool_mib << 20, args.cached)
        return
    if bool(args.old_rev) == bool(args.old_lib):
        parser.error("give one of --old-rev or --old-lib")
    from homeswarm.model.kernels.build import build

    new_lib = str(build())
    with tempfile.TemporaryDirectory(prefix="kernels-ab-") as tmp:
        old_lib = str(build_revision(args.old_rev, Path(tmp))) if args.old_rev else args.old_lib
        flags = ["--threads", str(args.threads), "--pool-mib", str(args.pool_mib)] + (["--cached"] if args.cached else [])
        procs = {who: subprocess.Popen([sys.executable, __file__, "--worker", lib, *flags], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
                 for who, lib in (("old", old_lib), ("new", new_lib))}
        try:
            run(procs, args)
        finally:
            for proc in procs.values():
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait(timeout=60)


def run(procs: dict[str, subprocess.Popen], args: argparse.Namespace) -> None:
    def timed(who: str, case: int, rows: int) -> dict:
        proc = procs[who]
        proc.stdin.write(f"{case} {rows}\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(proc.stdout.readline())  # type: ignore[union-attr]

    print(f"threads {args.threads}, {'in cache' if args.cached else 'from memory'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("weight | format | rows | old GB/s | new GB/s | new vs old")
    for case in (int(c) for c in args.cases.split(",")):
        name, _, _, fmt = CASES[case]
        for rows in (int(r) for r in args.rows.split(",")):
            for who in ("old", "new"):  # first passes: the weights' copies made, pages touched
                timed(who, case, rows)
            speeds: dict[str, list[float]] = {"old": [], "new": []}
            ratios = []
            for r in range(args.rounds):
                got = {who: timed(who, case, rows) for who in (("old", "new") if r % 2 == 0 else ("new", "old"))}
                for who, g in got.items():
                    speeds[who].append(g["bytes"] / g["seconds"] / 1e9)
                ratios.append(got["old"]["seconds"] / got["new"]["seconds"])
            print(f"{name} | {fmt} | {rows} | {statistics.median(speeds['old']):.1f} | "
                  f"{statistics.median(speeds['new']):.1f} | {statistics.median(ratios):.2f}x", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
