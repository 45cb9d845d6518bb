"""The --idle-only policy: a pure function of fake measurements, with time passed in."""

from __future__ import annotations

import pytest

from homeswarm.node.idle import IdleState, IdleThresholds, Measurement, initial_state, owner_presence, step

T = IdleThresholds(cpu_busy=0.5, input_idle=300.0, busy_after=10.0, idle_after=60.0)


def m(now: float, cpu: float | None = 0.0, idle: float | None = None, battery: bool | None = None) -> Measurement:
    return Measurement(now=now, other_cpu=cpu, input_idle=idle, on_battery=battery)


def run(measurements: list[Measurement], state: IdleState | None = None) -> list[bool]:
    state = state or IdleState(serving=True)
    serving = []
    for measurement in measurements:
        state = step(state, measurement, T)
        serving.append(state.serving)
    return serving


def test_an_idle_machine_serves():
    assert run([m(t, cpu=0.1, idle=3600.0, battery=False) for t in range(0, 100, 2)]) == [True] * 50


def test_a_cpu_load_steps_aside_after_busy_after_not_before():
    serving = run([m(0, 0.1), *(m(t, 0.9) for t in range(2, 20, 2))])
    # the load starts at t=2; at t=12 it has lasted busy_after (10 s)
    assert serving == [True, True, True, True, True, True, False, False, False, False]


def test_a_short_cpu_burst_is_ignored():
    assert run([m(0), m(2, 0.9), m(4, 0.9), m(6, 0.1), m(8, 0.9), m(10, 0.9), m(12, 0.1)]) == [True] * 7


def test_user_input_and_battery_step_aside_at_once():
    assert run([m(0), m(2, idle=5.0)]) == [True, False]
    assert run([m(0), m(2, battery=True)]) == [True, False]


def test_on_battery_may_be_allowed():
    t = IdleThresholds(serve_on_battery=True)
    assert step(IdleState(True), m(0, battery=True), t).serving


def test_input_ignored_when_disabled():
    t = IdleThresholds(input_idle=0.0)
    assert step(IdleState(True), m(0, idle=0.0), t).serving


def test_comes_back_after_idle_after_of_quiet():
    state = IdleState(serving=False)
    serving = run([m(0, 0.9), *(m(t, 0.1) for t in range(10, 90, 10))], state)
    # quiet from t=10; at t=70 it has been quiet for idle_after (60 s)
    assert serving == [False, False, False, False, False, False, False, True, True]


def test_the_owner_returning_during_the_wait_restarts_it():
    serving = run([m(0, 0.1), m(40, 0.1), m(50, idle=1.0), m(60, 0.1), m(110, 0.1), m(120, 0.1)],
                  IdleState(serving=False))
    assert serving == [False, False, False, False, False, True]  # quiet again from 60: serving at 120


@pytest.mark.parametrize("measurement", [m(0, cpu=None), m(0, idle=None), m(0, battery=None)])
def test_what_cannot_be_measured_never_counts_as_the_owner(measurement):
    assert owner_presence(measurement, T) == ("", False)
    assert initial_state(measurement, T).serving


def test_initial_state_reflects_the_machine_now():
    assert not initial_state(m(0, 0.9), T).serving
    assert initial_state(m(0, 0.9), T).reason == "other processes use 90 % of the CPU"
    assert initial_state(m(0, 0.2, idle=600.0), T).serving


def test_reasons_say_what_was_seen():
    assert owner_presence(m(0, idle=12.0), T) == ("user input 12 s ago", True)
    assert owner_presence(m(0, battery=True), T) == ("the machine runs on battery", True)
