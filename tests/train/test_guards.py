"""lmforge.train.guards in-process, one behaviour per test: the signal handler, the step flags, the
on-device skip and the non-finite guard's counting. The end-to-end checks (real signals to a real
run, NaNs injected into training, resumes) are in tests/reliability; these run in the test process,
where mutation testing (make mutate) can see them."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.train.guards import (
    NonFiniteGuard,
    StopSignal,
    skip_on_device,
    step_flags,
    supports_skip_on_device,
)


def test_a_signal_is_recorded_by_name_and_the_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS}
    with StopSignal() as stop:
        assert stop.requested is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM changes nothing
        assert stop.requested == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS} == before


def test_a_second_sigint_interrupts_but_a_first_does_not():
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    with StopSignal() as stop:  # SIGINT after SIGTERM interrupts too
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stop_signal_can_be_entered_again_in_another_thread():
    stop = StopSignal()
    with stop:
        pass
    errors = []

    def body():
        try:
            with stop:
                pass
            stop.__exit__(None, None, None)  # exiting twice is harmless too
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []


def test_outside_the_main_thread_the_handlers_are_left_alone():
    before = {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS}
    seen, errors = [], []

    def body():
        try:
            with StopSignal():
                seen.append({sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS})
        except Exception as err:  # an exception in a thread does not fail the test by itself
            errors.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before] and errors == []


@pytest.mark.parametrize(
    ("loss", "grad_norm", "check_grad", "stop", "flags"),
    [
        (1.0, 2.0, True, False, [0.0, 0.0]),
        (math.nan, 2.0, True, False, [1.0, 0.0]),
        (math.inf, 2.0, False, False, [1.0, 0.0]),
        (1.0, math.inf, True, False, [1.0, 0.0]),
        (1.0, math.nan, True, True, [1.0, 1.0]),
        (1.0, math.inf, False, False, [0.0, 0.0]),  # the gradient is not checked
        (1.0, 2.0, False, True, [0.0, 1.0]),
    ],
)
def test_step_flags(loss, grad_norm, check_grad, stop, flags):
    got = step_flags(torch.tensor(loss), torch.tensor(grad_norm), stop, check_grad)
    assert got.dtype == torch.float32 and got.tolist() == flags


def test_step_flags_take_the_maximum_over_the_ranks(monkeypatch):
    """With torch.distributed initialised the flags are all-reduced with MAX: a SUM would hand a
    fused AdamW a found_inf of 2 when two ranks see a NaN, which it does not read as a skip."""
    import torch.distributed as dist

    other_rank = torch.tensor([1.0, 0.0])  # another rank saw a NaN, no signal

    def all_reduce(tensor, op):  # two ranks, this one and the other
        assert op is dist.ReduceOp.MAX
        tensor.copy_(torch.maximum(tensor, other_rank))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert step_flags(torch.tensor(math.nan), torch.tensor(1.0), stop_requested=True, check_grad=True).tolist() == [
        1.0, 1.0
    ]  # fmt: skip
    assert step_flags(torch.tensor(1.0), torch.tensor(1.0), stop_requested=False, check_grad=True).tolist() == [
        1.0, 0.0
    ]  # fmt: skip


def test_a_flagged_step_leaves_a_fused_adamw_untouched():
    def optimizer_after(flag: float):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(4))
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
        param.grad = torch.ones(4)
        skip_on_device([optimizer], torch.tensor([flag, 0.0]))
        assert param.grad is None and not hasattr(optimizer, "found_inf")
        return param.detach().clone(), optimizer.state[param]["step"].item()

    torch.manual_seed(0)
    start = torch.randn(4)  # the parameter optimizer_after draws
    skipped, skipped_steps = optimizer_after(1.0)
    stepped, stepped_steps = optimizer_after(0.0)
    assert torch.equal(skipped, start) and skipped_steps == 0
    assert not torch.equal(stepped, start) and stepped_steps == 1


def test_only_a_fused_adam_or_adamw_skips_on_the_device():
    param = torch.nn.Parameter(torch.ones(2))
    assert supports_skip_on_device(torch.optim.AdamW([param], fused=True))
    assert supports_skip_on_device(torch.optim.Adam([param], fused=True))
    assert not supports_skip_on_device(torch.optim.AdamW([param]))
    assert not supports_skip_on_device(torch.optim.SGD([param], lr=0.1))


def guard(**train) -> NonFiniteGuard:
    return NonFiniteGuard(TrainConfig(**{"nonfinite_patience": 3, "rollback_lr_factor": 0.5, "max_rollbacks": 2,
                                         **train}))  # fmt: skip


def test_patience_counts_consecutive_bad_steps_and_rolls_back_with_a_lower_lr():
    g = guard()
    assert [g.record(s, bad) for s, bad in [(1, True), (2, True), (3, False), (4, True), (5, True)]] == [
        "skip", "skip", None, "skip", "skip"
    ]  # fmt: skip
    assert (g.consecutive, g.total, g.rollbacks, g.lr_scale) == (2, 4, 0, 1.0)
    assert g.record(6, True) == "rollback"
    assert (g.consecutive, g.total, g.rollbacks, g.lr_scale) == (0, 5, 1, 0.5)
    assert [g.record(s, True) for s in (7, 8, 9)] == ["skip", "skip", "rollback"]
    assert (g.rollbacks, g.lr_scale) == (2, 0.25)
    assert [g.record(s, True) for s in (10, 11)] == ["skip", "skip"]
    with pytest.raises(LmforgeError) as err:
        g.record(12, True)  # max_rollbacks reached: stop
    assert str(err.value) == (
        "training stopped: 3 consecutive steps (up to step 12) had a non-finite loss or gradient norm after 2 "
        "rollbacks (train.max_rollbacks)"
    )


def test_patience_one_acts_on_the_first_bad_step_and_stop_stops():
    assert guard(nonfinite_patience=1).record(4, True) == "rollback"
    g = guard(nonfinite_patience=2, nonfinite_action="stop")
    assert g.bad_step(6) == "skip"
    with pytest.raises(LmforgeError) as err:
        g.bad_step(7)
    assert str(err.value) == (
        "training stopped: 2 consecutive steps (up to step 7) had a non-finite loss or gradient norm "
        "(train.nonfinite_action is 'stop')"
    )


def test_the_guard_state_round_trips_and_defaults():
    g = guard()
    for step in range(1, 5):
        g.record(step, True)  # 3 bad: a rollback, then 1 more
    state = g.state_dict()
    assert state == {"nonfinite_steps": 4, "consecutive": 1, "rollbacks": 1, "lr_scale": 0.5}
    restored = guard()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    empty = guard()
    empty.load_state_dict({})  # a checkpoint from before the guard kept state
    assert empty.state_dict() == {"nonfinite_steps": 0, "consecutive": 0, "rollbacks": 0, "lr_scale": 1.0}


def test_the_step_flags_stay_on_the_losss_device():
    """The meta device stands in for a GPU: flags made on the CPU would not stack with a meta loss."""
    flags = step_flags(torch.ones((), device="meta"), torch.ones((), device="meta"), True, check_grad=True)
    assert flags.device.type == "meta" and flags.shape == (2,)
