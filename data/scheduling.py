"""Keeping the process's CPU scheduling policy across third-party encoders."""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def keep_scheduling():
    """Restore the calling thread's CPU scheduling policy on exit.

    Opening FFmpeg's SVT-AV1 encoder (libsvtav1) as root switches the calling thread to
    SCHED_FIFO priority 99 (measured here: policy 0 -> 1 after one avcodec_open2), and every
    process it starts afterwards inherits that. On a 2-core machine a real-time trainer whose
    OpenMP threads spin then starves everything else, itself included: a test run that had
    encoded AV1 early took 18 min for 5 smoke steps. Every encoder we open is wrapped in this."""
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)
