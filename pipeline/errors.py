"""One exception type for everything a user can fix; the CLI turns it into one line and an exit code."""

import contextlib
import signal


class UserError(Exception):
    """A problem with the input or the environment, stated so the user knows what to do.

    exit_code 2 is a usage error (bad flag value), 1 a runtime one (model not reachable, ...).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: runs are marked KILLED, checkpoints left as they were."""


def raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises Terminated, so runs end KILLED and nothing is left half-written."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
