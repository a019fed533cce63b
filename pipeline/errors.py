"""The errors a user can fix, said in one line, and SIGTERM handled like Ctrl-C.

The library never speaks in flags: a message names a setting with `option("lr")`, which the CLI spells
`--lr` (and `iterative_training_wrapper` spells `lr`). The CLI alone chooses exit codes: 2 for a
ConfigError (a wrong value), 1 for any other UserError (a missing file, an unreachable server).
"""

import contextlib
import re
import signal

_MARK = "\x1f"  # the ASCII unit separator: never part of a value a user types
_REFERENCE = re.compile(f"{_MARK}(\\w+){_MARK}")


def option(name: str) -> str:
    """A setting named inside a message, spelt later by whoever shows the message."""
    return f"{_MARK}{name}{_MARK}"


def spell(message: str, name_of=lambda name: name) -> str:
    """The message with every `option(...)` written as `name_of(setting)`."""
    return _REFERENCE.sub(lambda match: name_of(match[1]), message)


class UserError(Exception):
    """A problem with the input or the environment, stated so the user knows what to do."""

    exit_code = 1  # what the CLI exits with (ConfigError: 2)

    @property
    def template(self) -> str:
        return self.args[0] if self.args else ""

    def __str__(self) -> str:
        return spell(self.template)


class Continuable(UserError):
    """A fault after which the completed work is kept: the message says what happened, and `hint` how to
    continue, in the words of the command that was run (the outermost job sets it on the way out)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    @property
    def template(self) -> str:
        return self.args[0] + (f": {self.hint}" if self.hint else "")


class ConfigError(UserError, ValueError):
    """A setting's value is wrong (or settings contradict each other)."""


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
