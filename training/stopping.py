"""When a run stops before its end: preemption signals, a wall-clock limit,
a supervisor that is gone, and ranks that stop making progress
(docs/DESIGN.md section 3, "Stopping early").

Every rank calls `StopControl.poll()` at every step boundary. It is a
collective on the host (a gloo all-reduce of one small vector, beside NCCL
on GPUs), so all ranks learn at the same boundary that some rank received
SIGTERM, SIGINT or SIGUSR1, that its torchrun agent is gone, or that rank
0's clock passed --max-minutes, and all stop there: the training loop
writes a training state and raises `Stopped`, which train.py turns into
exit status EXIT_STOPPED. The same command resumes bit-exact.

Schedulers deliver signals in several ways, and each one must stop the run
cleanly: SLURM signals every process of the job (torchrun's agent, the
ranks and their DataLoader workers), a container runtime or Kubernetes the
first process (torchrun's agent, which forwards the signal to each rank's
process group, workers included, and kills what is left after its
--shutdown-timeout, 30 s by default), and often twice. So the ranks take a
repeated SIGTERM or SIGUSR1 as the same request (only a second SIGINT
forces an immediate end, as Ctrl-C users expect), and DataLoader workers
never die of these signals: they pass SIGTERM and SIGUSR1 on to their rank
and ignore SIGINT (`ForwardSignals`), so the main process owns
the shutdown. A worker killed by anything else still fails the run with
PyTorch's error naming it.

Under torchrun, a rank whose agent dies (SIGKILL, the OOM killer) notices
within seconds (its parent process changes, or the job's key-value store
stops answering) and stops at the next step boundary with a state like a
signalled one; if it cannot get there within --hang-timeout, it exits.

Before each wait in a step group a rank records in the job's key-value store
how many such waits it has entered and its last step (its heartbeat), and a
thread of each rank records the time every few seconds (its sign of life).
When a collective times out because a rank stopped answering (stuck, or
SIGSTOPped), `hung_rank_error` reads them and names the rank(s) behind.
"""

import os
import signal
import sys
import threading
import time

import dnnlib
from torch_utils import distributed as dist

EXIT_STOPPED = 75   # sysexits.h EX_TEMPFAIL: "a temporary failure; retry" (here: run the same command again)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)   # what a DataLoader worker passes on to its rank
_DEADLINE = -1      # the codes of the polled vector besides signal numbers: rank 0's clock passed --max-minutes,
_ORPHANED = -2      # and this rank's torchrun agent is gone
_WATCH_INTERVAL_S = 1


class Stopped(Exception):
    """The run stopped at a step boundary on request; its state is saved."""


class HungRank(RuntimeError):
    """A collective of a training step timed out: a rank stopped making progress."""


class StopControl:
    """Catches SIGTERM, SIGINT and SIGUSR1 (in the main thread), watches a
    wall-clock limit and, under torchrun, the agent; `poll` tells all ranks
    at once whether to stop.

    max_minutes: stop once this many minutes have passed since `start_time`
    (time.time() of the run's start; None = no limit). hang_timeout: seconds
    an orphaned rank (its agent gone) may take to reach the next step
    boundary and write its state before it exits anyway (None: never).
    A repeated SIGTERM or SIGUSR1 changes nothing; a second SIGINT while the
    first is pending restores the default handling and delivers it again,
    so a second Ctrl-C ends the process at once. Use as a context manager:
    the previous handlers come back on exit.
    """

    def __init__(self, max_minutes=None, start_time=None, hang_timeout=None):
        self.deadline = None if max_minutes is None else (start_time or time.time()) + 60 * float(max_minutes)
        self.hang_timeout = hang_timeout
        self.received = None
        self.orphaned = None   # why this rank's torchrun agent is thought gone, or None
        self._previous = {}
        self._closed = threading.Event()

    def __enter__(self):
        try:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:   # not the main thread: signals cannot be caught here
            self._previous.clear()
        if 'TORCHELASTIC_RUN_ID' in os.environ:   # launched by torchrun: its agent is our parent
            threading.Thread(target=self._watch_agent, args=(os.getppid(),), daemon=True).start()
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._closed.set()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signum:   # Ctrl-C twice: do not wait for the boundary
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signum

    def _watch_agent(self, agent_pid):
        """Thread: note when the torchrun agent is gone (this process is
        re-parented, or the job's store stopped answering); then give the
        main thread --hang-timeout seconds to stop with a state, and end the
        process if it has not."""
        while not self._closed.wait(_WATCH_INTERVAL_S):
            if os.getppid() != agent_pid:
                self.orphaned = f'its torchrun agent (pid {agent_pid}) is gone'
            elif dist.store_lost():
                self.orphaned = 'the job\'s key-value store (torchrun\'s agent) stopped answering'
            if self.orphaned is not None:
                break
        if self.orphaned is None or self.hang_timeout is None:
            return
        time.sleep(self.hang_timeout)   # the process normally ends before this: a daemon thread ends with it
        sys.stderr.write(f'Error: rank {dist.get_rank()}: {self.orphaned}, and the rank could not stop at a step '
                         f'boundary within --hang-timeout={self.hang_timeout:g} s; exiting without a new training '
                         f'state\n')
        sys.stderr.flush()
        os._exit(1)

    def poll(self, step):
        """The reason to stop now, the same on every rank, or None. A collective:
        every rank calls it at the same step boundaries. `step`: the number of
        steps done (recorded as this rank's heartbeat)."""
        dist.heartbeat(step)
        mine = int(self.received or 0)
        if mine == 0 and self.orphaned is not None:
            mine = _ORPHANED
        if dist.get_rank() == 0 and mine == 0 and self.deadline is not None and time.time() >= self.deadline:
            mine = _DEADLINE
        codes = dist.gather_ints(mine)
        if any(code > 0 for code in codes):
            return ', '.join(f'{signal.Signals(code).name} received on rank {rank}' for rank, code in enumerate(codes)
                             if code > 0)
        if _ORPHANED in codes:
            return ', '.join(f'rank {rank}: its torchrun agent is gone' for rank, code in enumerate(codes)
                             if code == _ORPHANED)
        if any(codes):
            return 'the --max-minutes limit was reached'
        return None


class ForwardSignals:
    """A DataLoader `worker_init_fn`: in a worker, SIGTERM and SIGUSR1 are sent
    on to the rank (`pid`, the process that made the worker) and SIGINT is
    ignored (a Ctrl-C reaches the rank itself), so that a scheduler's signal
    to every process of the job stops the run at a step boundary instead of
    killing the workers under the rank. A class, so that it pickles for
    workers that are spawned rather than forked."""

    def __init__(self, pid, then=None):
        self.pid, self.then = pid, then

    def __call__(self, worker_id):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum in FORWARDED:
            signal.signal(signum, self._forward)
        if self.then is not None:
            self.then(worker_id)

    def _forward(self, signum, frame):
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:   # the rank is gone: the worker follows
            os._exit(1)


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
