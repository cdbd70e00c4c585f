"""Learning-rate schedules and importance-minimality p annealing against closed forms."""

import pytest

from spd_ray.core.schedule import annealed_p, scheduled_value


@pytest.mark.parametrize("fn_type", ["linear", "cosine"])
@pytest.mark.parametrize("final_val_frac", [0.0, 0.1, 0.5])
def test_endpoints(fn_type, final_val_frac):
    total = 50
    assert scheduled_value(0, total, 2.0, 0.0, final_val_frac, fn_type) == pytest.approx(2.0)
    last = scheduled_value(total - 1, total, 2.0, 0.0, final_val_frac, fn_type)
    assert last == pytest.approx(2.0 * final_val_frac, abs=1e-12)


@pytest.mark.parametrize("fn_type", ["linear", "cosine"])
def test_monotone_decay(fn_type):
    values = [scheduled_value(s, 100, 1.0, 0.1, 0.2, fn_type) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] > values[-1]


def test_final_val_frac_above_one_increases():
    values = [scheduled_value(s, 20, 1.0, 0.0, 3.0, "linear") for s in range(20)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(3.0)


def test_warmup_starts_at_zero_and_is_linear():
    # 100 steps, 20 % warmup: 0 at step 0, start_val * step / 20 during warmup, start_val after.
    total, start = 100, 4.0
    vals = [scheduled_value(s, total, start, 0.2, 0.0, "cosine") for s in range(total)]
    assert vals[0] == 0.0
    for s in range(20):
        assert vals[s] == pytest.approx(start * s / 20)
    assert vals[20] == pytest.approx(start)
    assert vals[-1] == pytest.approx(0.0, abs=1e-12)


def test_full_warmup_ends_just_below_start():
    assert scheduled_value(99, 100, 1.0, 1.0, 1.0, "constant") == pytest.approx(0.99)


def test_linear_midpoint():
    # progress = step / (total - 1) = 0.5 at step 50 of 101.
    assert scheduled_value(50, 101, 2.0, 0.0, 0.5, "linear") == pytest.approx(1.5)


def test_cosine_midpoint():
    start, frac = 3.0, 0.2
    exact = scheduled_value(50, 101, start, 0.0, frac, "cosine")
    assert exact == pytest.approx(0.5 * (start + start * frac))
    near = scheduled_value(100, 200, start, 0.0, frac, "cosine")  # progress 100/199
    assert near == pytest.approx(0.5 * (start + start * frac), rel=1e-2)


def test_constant():
    assert {scheduled_value(s, 30, 0.7, 0.0, 1.0, "constant") for s in range(30)} == {0.7}
    assert scheduled_value(29, 30, 0.7, 0.5, 1.0, "constant") == 0.7


@pytest.mark.parametrize("fn_type", ["constant", "linear", "cosine"])
def test_single_step(fn_type):
    frac = 1.0 if fn_type == "constant" else 0.0
    assert scheduled_value(0, 1, 0.5, 0.0, frac, fn_type) == 0.5


@pytest.mark.parametrize("fn_type", ["linear", "cosine"])
def test_two_steps(fn_type):
    assert scheduled_value(0, 2, 0.5, 0.0, 0.0, fn_type) == pytest.approx(0.5)
    assert scheduled_value(1, 2, 0.5, 0.0, 0.0, fn_type) == pytest.approx(0.0, abs=1e-12)


def test_annealed_p():
    # p0 = 2 before start 0.25, linear to 1 until 0.75, 1 after.
    assert annealed_p(0.0, 2.0, 1.0, 0.25, 0.75) == 2.0
    assert annealed_p(0.25, 2.0, 1.0, 0.25, 0.75) == pytest.approx(2.0)
    assert annealed_p(0.5, 2.0, 1.0, 0.25, 0.75) == pytest.approx(1.5)
    assert annealed_p(0.625, 2.0, 1.0, 0.25, 0.75) == pytest.approx(1.25)
    assert annealed_p(0.75, 2.0, 1.0, 0.25, 0.75) == 1.0
    assert annealed_p(1.0, 2.0, 1.0, 0.25, 0.75) == 1.0


def test_annealed_p_disabled():
    assert annealed_p(0.9, 2.0, None, 0.0, 1.0) == 2.0
    assert annealed_p(0.9, 2.0, 1.0, 1.0, 1.0) == 2.0
