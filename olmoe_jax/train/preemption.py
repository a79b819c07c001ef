"""Preemption: SIGTERM / SIGINT end a training run after the current step, with a checkpoint.

Single process: a handler notes the first SIGTERM or SIGINT; the loop asks `should_stop(step)`
after each step, saves that step and returns (exit 0). A second signal restores the default
action and re-raises it: the process stops at once (and its exit status is the signal's).

Multi-process (jax.distributed initialised): every process must save the same step.
- SIGTERM belongs to jax's preemption service (installed by jax.distributed.initialize; it is
  how TPU VMs and most schedulers announce preemption): `multihost_utils.
  reached_preemption_sync_point(step)`, called every step, turns True on all processes at the
  same step (the maximum step any process had reached, plus one). We do not install a Python
  SIGTERM handler there, since it would replace the service's.
- SIGINT (no service for it): each process keeps a local flag; at log steps, where the loop
  synchronises anyway, the processes all-gather their flags and stop together if any is set.

Bounded time to exit after the first signal: the rest of the current step (for the first step
of a process, its compile), then one synchronous checkpoint write and its hashing
(integrity.py); on multi-process runs with SIGINT, up to train.log_every steps more.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _distributed() -> bool:
    from jax._src import distributed  # pylint: disable=import-outside-toplevel
    return distributed.global_state.client is not None


class PreemptionWatch:
    """Installs the handlers for the life of a training run (a context manager).

    `signal_name`: "SIGTERM" / "SIGINT" once one was received (None before).
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._multi = jax.process_count() > 1 and _distributed()
        self._old: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python only delivers signals to the main thread's handlers
        for sig in _SIGNALS:
            if sig == signal.SIGTERM and self._multi:
                continue  # jax's preemption service owns SIGTERM on multi-process runs
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # the second signal: stop now, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        if jax.process_index() == 0:
            print(f"received {name}: finishing the current step, saving a checkpoint, then exiting "
                  f"(send {name} again to stop at once, without saving)", file=sys.stderr, flush=True)

    def should_stop(self, step: int, *, sync_point: bool) -> bool:
        """Whether to save `step` and stop. Call on every process after every step; `sync_point`:
        the loop synchronises at this step anyway (a log step), so processes may compare flags."""
        if not self._multi:
            return self.signal_name is not None
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        if sync_point:
            flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
            if np.any(flags):
                self.signal_name = self.signal_name or "SIGINT"
                return True
        return False
