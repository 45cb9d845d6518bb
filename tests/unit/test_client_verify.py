"""Who is wrong when two servers disagree (pure, with fake recomputations), and the tolerances."""

from __future__ import annotations

import pytest
import torch

from homeswarm.client.verify import Culprit, judge, rel_err, tolerance

TRUE = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
TOL = tolerance("float32", "none", "none")


def noisy(seed: int) -> torch.Tensor:
    return TRUE + 0.5 * torch.randn(TRUE.shape, generator=torch.Generator().manual_seed(seed))


def never() -> torch.Tensor:
    raise AssertionError("not asked")


def test_a_hop_that_does_not_reproduce_its_answer_is_caught():
    assert judge(noisy(1), TRUE, hop_again=lambda: noisy(2), replica_again=never, third=never, tol=TOL) is Culprit.HOP


def test_a_replica_that_does_not_reproduce_its_answer_is_caught():
    got = judge(TRUE, noisy(1), hop_again=lambda: TRUE.clone(), replica_again=lambda: noisy(2), third=never, tol=TOL)
    assert got is Culprit.REPLICA


def test_a_false_alarm_is_nobodys_fault():
    assert judge(TRUE, TRUE * 1.01, hop_again=lambda: TRUE * 1.0001 + 0.01 * TRUE, replica_again=never,
                 third=never, tol=0.02) is Culprit.NONE


@pytest.mark.parametrize(("third", "culprit"), [
    (lambda: TRUE.clone(), Culprit.REPLICA),  # the third agrees with the hop
    (lambda: noisy(1), Culprit.HOP),  # the third agrees with the replica
    (lambda: noisy(7), Culprit.UNDECIDED),  # the third agrees with neither
    (lambda: None, Culprit.UNDECIDED),  # there is no third
])
def test_two_consistent_servers_need_a_third(third, culprit):
    # a deterministic liar: each side reproduces its own answer
    got = judge(TRUE, noisy(1), hop_again=lambda: TRUE.clone(), replica_again=lambda: noisy(1), third=third, tol=TOL)
    assert got is culprit


def test_tolerance_grows_with_rounding():
    assert tolerance("float32", "none", "none") < tolerance("bfloat16", "none", "none")
    assert tolerance("bfloat16", "none", "none") < tolerance("bfloat16", "int4", "none")
    assert tolerance("float32", "none", "none") < tolerance("float32", "none", "int8")
    assert rel_err(TRUE, TRUE) == 0.0
    assert rel_err(noisy(1), TRUE) > 3 * tolerance("bfloat16", "int4", "int8")  # the faulty node's noise
