"""SIGTERM and Ctrl-C: what a scheduler (Slurm, Kubernetes, a cloud's preemption) or a user sends to stop a process.

Every CLI runs inside `handled()` (errors.cli does it): SIGTERM then raises `Signalled` where the program is, as
Ctrl-C raises KeyboardInterrupt, so the atomic writes of product/files.py remove their temporaries and no partial
file is left; the exit status is 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C), which schedulers read.

train.py's steps run with the signals *deferred* (`stop.deferring`, set by run_folder.Run.steps): the first SIGTERM
or Ctrl-C is only recorded, the step in progress finishes, every process agrees to stop after that step, a checkpoint
of it is written and then `Signalled` ends the run, with the one line saying that --resume continues from it. During
that save a second Ctrl-C ends it at once (the checkpoint being written is discarded whole); a repeated SIGTERM is
ignored, since a scheduler may send it more than once (Slurm to every process of the job step, torchrun again to
its workers); SIGKILL cannot be caught, and then the atomic writes leave only temporaries, which the next run
removes.

pause_for_test(label) is a test hook: with DCO_TEST_PAUSE="step 3" (labels separated by commas) the process stops
itself (SIGSTOP) when it reaches that point, so a test can send a signal at an exact point of a run and SIGCONT it;
no timing is involved. The labels: "step N" (train.py, after its N-th step, before it checks for a stop) and
"write NAME" (product/files.atomic: NAME's temporary is complete, before it is renamed into place).
"""
import os
import signal
import threading
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Signalled(KeyboardInterrupt):
    """The process was asked to stop by signal `signum` (a KeyboardInterrupt, so whatever cleans up after Ctrl-C
    cleans up after it too)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """The state of the signals of this process: while `deferring`, the first signal is only recorded in `signum`."""

    def __init__(self):
        self.deferring, self.signum = False, None

    def handler(self, signum, frame):
        if not self.deferring:  # anywhere but train.py's steps: stop now
            raise KeyboardInterrupt if signum == signal.SIGINT else Signalled(signum)
        if self.signum is None:  # the first: finish the step, checkpoint it, exit
            self.signum = signum
        elif signum == signal.SIGINT:  # Ctrl-C again, during the save: now (the save is discarded whole)
            raise Signalled(signum)
        # a repeated SIGTERM: ignored (a scheduler may send it to every process, and torchrun again)

    def requested(self):
        """The number of the signal that asked to stop, 0 for none. A call, so that a handler due is run first
        (Python runs them between bytecodes, at latest when a function starts)."""
        return self.signum or 0


stop = Stop()


@contextmanager
def handled():
    """SIGTERM and SIGINT through `stop.handler` while the block runs (main thread only, as Python requires), then
    the handlers as they were."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, stop.handler) for s in HANDLED}
    stop.deferring, stop.signum = False, None
    try:
        yield
    finally:
        stop.deferring, stop.signum = False, None
        for s, h in before.items():
            signal.signal(s, h)


def pause_for_test(label):
    """The test hook: SIGSTOP this process if DCO_TEST_PAUSE names `label` (see the module's docstring)."""
    if label in (p.strip() for p in os.environ.get("DCO_TEST_PAUSE", "").split(",")):
        os.kill(os.getpid(), signal.SIGSTOP)
