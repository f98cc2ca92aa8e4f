"""Learning-rate schedules: warmup, cosine, warmup-stable-decay, and the scheduler's state."""

import math
import random
from itertools import pairwise

import pytest
import torch

from sparsetron.train.config import ScheduleConfig
from sparsetron.train.schedule import build_scheduler, lr_multiplier


def values(cfg, total):
    return [lr_multiplier(cfg, s, total) for s in range(total)]


def test_warmup_is_linear_and_reaches_the_peak():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=7, min_lr_ratio=0.1)
    v = values(cfg, 50)
    assert v[:7] == pytest.approx([(s + 1) / 7 for s in range(7)])
    assert max(v) == pytest.approx(1.0)


def test_cosine_matches_formula_and_ends_at_min():
    warmup, total, floor = 5, 41, 0.2
    cfg = ScheduleConfig(kind="cosine", warmup_steps=warmup, min_lr_ratio=floor)
    v = values(cfg, total)
    for s in range(warmup, total):
        progress = (s - warmup) / (total - 1 - warmup)
        assert v[s] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert v[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in pairwise(v[warmup:]))


def test_wsd_is_flat_then_decays_linearly_to_min():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=4, min_lr_ratio=0.05, decay_fraction=0.25)
    total = 40
    v = values(cfg, total)
    assert v[4:30] == pytest.approx([1.0] * 26)
    decay = v[30:]
    steps = [a - b for a, b in pairwise(decay)]
    assert steps == pytest.approx([steps[0]] * len(steps))
    assert v[-1] == pytest.approx(0.05)


def test_constant_stays_at_peak_after_warmup():
    assert values(ScheduleConfig(kind="constant", warmup_steps=3), 20)[3:] == pytest.approx([1.0] * 17)


@pytest.mark.parametrize("warmup", [3, 0.2], ids=["count", "fraction"])
def test_scheduler_rebuilt_at_a_step_continues_the_same_sequence(warmup):
    # A fraction resolves against the whole run (0.2 of 25 = 5 steps), also when resumed mid-warm-up.
    cfg = ScheduleConfig(kind="cosine", warmup_steps=warmup)
    start = random.randint(1, 24)

    def make(start_step=0):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.5)
        return opt, build_scheduler(opt, cfg, 25, start_step)

    opt, sched = make()
    straight = []
    for _ in range(25):
        straight.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt, sched = make(start_step=start)
    resumed = []
    for _ in range(25 - start):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert resumed == straight[start:]
    assert resumed[0] == 0.5 * lr_multiplier(cfg, start, 25)
    assert straight[: cfg.warmup_for(25)] == [0.5 * ((s + 1) / cfg.warmup_for(25)) for s in range(cfg.warmup_for(25))]
