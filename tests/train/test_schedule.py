import math

import pytest

from lmforge.config import ScheduleConfig
from lmforge.train.schedule import lr_at


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_and_reaches_peak(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 1.0, 100) for s in range(10)]
    assert lrs == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, cfg, 1.0, 100) == pytest.approx(1.0)


def test_cosine_decays_to_min_lr():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(55, cfg, 2.0, 100) == pytest.approx(0.2 + 0.5 * 1.8 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg, 2.0, 100) == pytest.approx(0.2)
    lrs = [lr_at(s, cfg, 2.0, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_linear_and_constant():
    linear = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, linear, 1.0, 100) == pytest.approx(0.5)
    constant = ScheduleConfig(name="constant", warmup_steps=0)
    assert lr_at(99, constant, 1.0, 100) == 1.0


def test_wsd_is_flat_then_decays_over_last_fraction():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [lr_at(s, cfg, 1.0, 100) for s in (10, 50, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_at(90, cfg, 1.0, 100) == pytest.approx(0.5)
    assert lr_at(100, cfg, 1.0, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_cosine_and_linear_decay_have_their_own_shapes(fraction):
    """Inside the decay, cosine follows (1 + cos(pi p)) / 2 and linear 1 - p, with a floor above 0."""
    peak, floor = 2.0, 0.2  # min_lr_ratio 0.1
    cosine = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.1)
    linear = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.1)
    step = int(fraction * 100)
    assert lr_at(step, cosine, peak, 100) == pytest.approx(
        floor + (peak - floor) * (1 + math.cos(math.pi * fraction)) / 2
    )
    assert lr_at(step, linear, peak, 100) == pytest.approx(peak - (peak - floor) * fraction)
    wsd = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=1.0)
    assert lr_at(step, wsd, peak, 100) == pytest.approx(peak - (peak - floor) * fraction)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_past_the_end_of_the_schedule_the_lr_stays_at_its_floor(name):
    """train.max_steps may exceed the schedule's total_steps: the LR then stays at min_lr."""
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.5)
    assert [lr_at(s, cfg, 2.0, 100) for s in (100, 150, 400)] == pytest.approx([0.2, 0.2, 0.2])
    one_decay_step = ScheduleConfig(name=name, warmup_steps=99, min_lr_ratio=0.1, decay_fraction=0.01)
    assert lr_at(99, one_decay_step, 2.0, 100) == pytest.approx(2.0)
    assert lr_at(100, one_decay_step, 2.0, 100) == pytest.approx(0.2)
