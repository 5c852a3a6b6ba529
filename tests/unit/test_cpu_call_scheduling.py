"""The calling thread waits for IREE's CPU workers under SCHED_BATCH (runtime/iree_module.py).

Why: with the default policy the woken caller preempted the worker it was joining and spun for a
scheduler time slice (3 ms attention calls took 8 ms on the 2-core machine). These tests pin down
the mechanism — the policy inside and after the block, a thread already in another policy left
alone, a CPU call going through it — not the timing, which `benchmarks/attention_cpu.py` shows.
"""

import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from flashmlir.runtime import iree_module

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


def test_batch_policy_inside_the_block_and_the_default_after():
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with iree_module._WakeWithoutPreemption() as switched:
        assert switched
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_thread_in_another_policy_is_left_alone():
    seen = []

    def in_idle_policy():  # a thread of its own: the policy is per thread, and the test's stays
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        with iree_module._WakeWithoutPreemption() as switched:
            seen.append((switched, os.sched_getscheduler(0)))
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=in_idle_policy)
    thread.start()
    thread.join()
    assert seen == [(False, os.SCHED_IDLE), os.SCHED_IDLE]


def test_cpu_calls_wait_under_the_batch_policy(monkeypatch):
    entered = []

    class Recording(iree_module._WakeWithoutPreemption):
        def __enter__(self):
            switched = super().__enter__()
            entered.append((switched, os.sched_getscheduler(0)))
            return switched

    monkeypatch.setattr(iree_module, "_WakeWithoutPreemption", Recording)
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="flashmlir")
    with torch.no_grad():
        out = compiled(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert entered and all(policy == os.SCHED_BATCH for _, policy in entered)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
