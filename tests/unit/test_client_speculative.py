"""Speculative decoding without a network: the acceptance rule, the draft length choice, prompt lookup.

The target is a bigram model over a tiny vocabulary (the next token's logits depend on the current token
only), so the exact distribution of a whole generated sequence is a product of table entries; speculative
sampling's output sequences are held against it with a chi-square test (fixed seeds, bounded time).
"""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch

from homeswarm.client.drafters import PromptLookupDrafter
from homeswarm.client.sampling import SamplingParams, probabilities
from homeswarm.client.speculative import DraftLength, SpeculativeDecoder, verify

VOCAB = 4
NEW = 3
SAMPLES = 3000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: torch's intra-op threads only cost here (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bigram_table(seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


class Bigram:
    """A verifier over a bigram table that also keeps a cache, so rollbacks are checked as the nodes do."""

    def __init__(self, table: torch.Tensor, prompt: list[int]) -> None:
        self.table = table
        self.cache = list(prompt)
        self.rounds = 0

    def __call__(self, ids: list[int], keep: int | None) -> torch.Tensor:
        if keep is not None:
            assert 0 <= keep <= len(self.cache)
            del self.cache[keep:]
        self.cache.extend(ids)
        self.rounds += 1
        return self.table[torch.tensor(ids)]


class BigramDrafter:
    """Samples drafts from its own bigram table (``q``), or proposes deterministically when ``fixed``."""

    name = "bigram"

    def __init__(self, table: torch.Tensor, fixed: bool = False) -> None:
        self.table, self.fixed = table, fixed

    def draft(self, tokens, k, params, generator):
        drafts, dists, last = [], [], tokens[-1]
        for _ in range(k):
            if self.fixed:
                last = (last + 1) % VOCAB
            else:
                q = probabilities(self.table[last], params)
                last = int(torch.multinomial(q, 1, generator=generator))
                dists.append(q)
            drafts.append(last)
        return drafts, (torch.stack(dists) if dists else None)


def exact_distribution(table: torch.Tensor, params: SamplingParams, prompt_last: int) -> dict[tuple, float]:
    p = probabilities(table, params)
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        prob, last = 1.0, prompt_last
        for token in seq:
            prob *= float(p[last, token])
            last = token
        out[seq] = prob
    return out


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def speculative_counts(params: SamplingParams, drafter, seed: int) -> collections.Counter:
    target = bigram_table(1)
    generator = torch.Generator().manual_seed(seed)
    counts: collections.Counter = collections.Counter()
    for _ in range(SAMPLES):
        verifier = Bigram(target, [0])
        first = target[0]
        decoder = SpeculativeDecoder(drafter, verifier, params, generator=generator, room=64,
                                     length=DraftLength(max_k=3, acceptance=0.9))
        counts[tuple(decoder.stream([0], first, NEW, []))] += 1
    return counts


def chi_square(counts: collections.Counter, exact: dict[tuple, float]) -> tuple[float, int]:
    """(statistic, degrees of freedom), cells with fewer than 5 expected merged into one."""
    stat, small_observed, small_expected, cells = 0.0, 0, 0.0, 0
    for seq, prob in exact.items():
        expected = prob * SAMPLES
        if prob == 0:
            assert counts[seq] == 0, f"{seq} has probability 0 but was generated {counts[seq]} times"
        elif expected < 5:
            small_observed += counts[seq]
            small_expected += expected
        else:
            stat += (counts[seq] - expected) ** 2 / expected
            cells += 1
    if small_expected > 0:
        stat += (small_observed - small_expected) ** 2 / small_expected
        cells += 1
    return stat, cells - 1


@pytest.mark.parametrize(("params", "fixed"), [
    (SamplingParams(do_sample=True, temperature=1.0), False),
    (SamplingParams(do_sample=True, temperature=0.7, top_k=3), False),
    (SamplingParams(do_sample=True, temperature=1.3, top_p=0.9), True),
])
def test_speculative_sampling_keeps_the_distribution(params, fixed):
    drafter = BigramDrafter(bigram_table(2), fixed=fixed)
    counts = speculative_counts(params, drafter, seed=7)
    stat, df = chi_square(counts, exact_distribution(bigram_table(1), params, 0))
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_the_chi_square_test_catches_a_wrong_rule(monkeypatch):
    """The test above can fail: accepting every draft (the draft model's distribution) is caught."""
    import homeswarm.client.speculative as speculative

    real = speculative.verify

    def accept_all(logits, drafts, q, params, generator):
        return len(drafts), real(logits[-1:], [], None, params, generator)[1]

    monkeypatch.setattr(speculative, "verify", accept_all)
    params = SamplingParams(do_sample=True)
    counts = speculative_counts(params, BigramDrafter(bigram_table(2)), seed=7)
    stat, df = chi_square(counts, exact_distribution(bigram_table(1), params, 0))
    assert stat > chi2_critical(df)


@pytest.mark.parametrize("tokens_only", [False, True])
def test_greedy_is_plain_greedy_and_the_cache_is_rolled_back(tokens_only):
    """Through ``verify_fn`` (logits) or ``greedy_verify_fn`` (the verifier's own greedy tokens)."""
    table = bigram_table(3, scale=3.0)
    prompt = [0, 1, 2, 3, 0, 1]
    plain, last = [], prompt[-1]
    for _ in range(60):
        last = int(table[last].argmax())
        plain.append(last)
    verifier = Bigram(table, prompt)

    def logits_unused(ids, keep):
        raise AssertionError("greedy decoding asked for logits")

    def greedy_tokens(ids, keep):
        return verifier(ids, keep).argmax(dim=-1).tolist()

    decoder = SpeculativeDecoder(PromptLookupDrafter(), logits_unused if tokens_only else verifier, SamplingParams(),
                                 room=200, greedy_verify_fn=greedy_tokens if tokens_only else None)
    got = list(decoder.stream(prompt, table[prompt[-1]], 60, []))
    assert got == plain
    assert verifier.cache == (prompt + got)[: len(verifier.cache)]  # no rejected draft left in the cache
    assert decoder.stats.accepted > 0 and verifier.rounds < 60  # the cycle was drafted: fewer rounds


def test_stops_at_eos_and_max_new_tokens():
    table = torch.full((VOCAB, VOCAB), -5.0)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 5.0  # 0 1 2 3 0 1 2 3 ...
    decoder = SpeculativeDecoder(PromptLookupDrafter(), Bigram(table, [0, 1, 2, 3, 0]), SamplingParams(), room=50)
    assert list(decoder.stream([0, 1, 2, 3, 0], table[0], 10, [3])) == [1, 2, 3]
    decoder = SpeculativeDecoder(PromptLookupDrafter(), Bigram(table, [0, 1, 2, 3, 0]), SamplingParams(), room=50)
    assert list(decoder.stream([0, 1, 2, 3, 0], table[0], 7, [])) == [1, 2, 3, 0, 1, 2, 3]


def test_verify_greedy():
    logits = torch.tensor([[0.0, 9, 0, 0], [0, 0, 9, 0], [9, 0, 0, 0]])
    assert verify(logits, [1, 2], None, SamplingParams(), None) == (2, 0)
    assert verify(logits, [1, 3], None, SamplingParams(), None) == (1, 2)
    assert verify(logits, [0, 2], None, SamplingParams(), None) == (0, 1)


def test_prompt_lookup():
    drafter = PromptLookupDrafter(max_ngram=3)
    assert drafter.draft([5, 6, 7, 8, 9, 5, 6, 7], 3)[0] == [8, 9, 5]
    assert drafter.draft([1, 2, 3, 1, 2, 4, 1, 2], 2)[0] == [4, 1]  # the latest match
    assert drafter.draft([1, 2, 3, 4], 4)[0] == []
    assert drafter.draft([7], 4)[0] == []
    assert drafter.draft([3, 3, 3], 0)[0] == []


def test_draft_length_follows_acceptance_and_round_trip():
    slow_network = DraftLength(max_k=8)
    for k in (2, 4, 6) * 4:
        slow_network.update(k, k, 0.100 + 0.001 * k, 0.0)  # every draft accepted, 100 ms round trips
    assert slow_network.choose(100) == 8
    assert slow_network.choose(3) == 3
    assert slow_network.choose(0) == 0
    poor = DraftLength(max_k=8)
    for k in (2, 4, 6) * 4:
        poor.update(k, 0, 0.010 + 0.0002 * k, 0.0)  # nothing accepted, drafts cost very little
    assert poor.choose(100) == 1
    costly = DraftLength(max_k=8, probe_every=4)
    for k in (0, 1) * 6:
        costly.update(k, 0, 0.010, 0.010 * k)  # a draft costs as much as a round and is never accepted
    assert [costly.choose(100) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # probes now and then
