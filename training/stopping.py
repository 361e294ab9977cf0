"""When a run stops before its end: preemption signals, a wall-clock limit,
and ranks that stop making progress (docs/DESIGN.md section 3, "Stopping
early").

Every rank calls `StopControl.poll()` at every step boundary. It is a
collective on the host (a gloo all-reduce of one small vector, beside NCCL
on GPUs), so all ranks learn at the same boundary that some rank received
SIGTERM, SIGINT or SIGUSR1, or that rank 0's clock passed --max-minutes, and
all stop there: the training loop writes a training state and raises
`Stopped`, which train.py turns into exit status EXIT_STOPPED. The same
command resumes bit-exact.

Before each wait in a step group a rank records in the job's key-value store
how many such waits it has entered and its last step (its heartbeat), and a
thread of each rank records the time every few seconds (its sign of life).
When a collective times out because a rank stopped answering (stuck, or
SIGSTOPped), `hung_rank_error` reads them and names the rank(s) behind.
"""

import signal
import time

import dnnlib
from torch_utils import distributed as dist

EXIT_STOPPED = 75   # sysexits.h EX_TEMPFAIL: "a temporary failure; retry" (here: run the same command again)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_DEADLINE = -1      # the code of "rank 0's clock passed --max-minutes" in the polled vector


class Stopped(Exception):
    """The run stopped at a step boundary on request; its state is saved."""


class HungRank(RuntimeError):
    """A collective of a training step timed out: a rank stopped making progress."""


class StopControl:
    """Catches SIGTERM, SIGINT and SIGUSR1 (in the main thread) and watches a
    wall-clock limit; `poll` tells all ranks at once whether to stop.

    max_minutes: stop once this many minutes have passed since `start_time`
    (time.time() of the run's start; None = no limit). A second signal of the
    same kind while the first is pending restores the default handling and
    delivers it again, so a second Ctrl-C ends the process at once.
    Use as a context manager: the previous handlers come back on exit.
    """

    def __init__(self, max_minutes=None, start_time=None):
        self.deadline = None if max_minutes is None else (start_time or time.time()) + 60 * float(max_minutes)
        self.received = None
        self._previous = {}

    def __enter__(self):
        try:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:   # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.received == signum:   # asked twice: give up waiting for the step boundary
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def poll(self, step):
        """The reason to stop now, the same on every rank, or None. A collective:
        every rank calls it at the same step boundaries. `step`: the number of
        steps done (recorded as this rank's heartbeat)."""
        dist.heartbeat(step)
        mine = int(self.received or 0)
        if dist.get_rank() == 0 and mine == 0 and self.deadline is not None and time.time() >= self.deadline:
            mine = _DEADLINE
        codes = dist.gather_ints(mine)
        if any(code > 0 for code in codes):
            return ', '.join(f'{signal.Signals(code).name} received on rank {rank}' for rank, code in enumerate(codes)
                             if code > 0)
        if any(codes):
            return 'the --max-minutes limit was reached'
        return None


def is_timeout(err):
    """Whether `err` is a collective that timed out (gloo's and NCCL's wording)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ('timed out' in text or 'timeout' in text)


def hung_rank_error(err, timeout_s, run_dir):
    """The HungRank error to raise when a collective timed out. Names the
    rank(s) that entered fewer waits than this one or, where all entered as
    many, those without a sign of life for several intervals (a stopped or
    frozen process), with their last step, as far as the store tells."""
    beats = dist.read_heartbeats()
    rank = dist.get_rank()
    mine = beats.get(rank)
    behind = []
    if mine is not None and mine[0] is not None:
        behind = [r for r, (count, _, _) in beats.items() if count is None or count < mine[0]]
        if not behind:
            behind = [r for r, (_, _, silent) in beats.items()
                      if silent is None or silent > 3 * dist.ALIVE_INTERVAL_S]
    if behind:
        where = ', '.join(f'rank {r} (at step {beats[r][1]})' if beats[r][1] is not None else
                          f'rank {r} (before its first step)' for r in sorted(behind))
        who = f'{where} stopped making progress while rank {rank} reached step {mine[1]}'
    else:
        who = 'a rank stopped answering'
    return HungRank(f'{who}: no answer for {timeout_s:g} s (--hang-timeout). The newest training state in '
                    f'{run_dir} is the last complete one; run the same command to resume '
                    f'(collective error: {dnnlib.util.one_line(err)[:200]})')
