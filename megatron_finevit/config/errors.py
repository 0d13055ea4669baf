"""User errors: problems a user fixes in the config, the command line or the file system.

Entry points (``train``, ``evaluate``, the tools) catch ``UserError``, print one line per problem
(``config error: stage_config.data.max_pixel: unknown key (did you mean max_pixels?)``) on global
rank 0 only and exit with code 2, without a traceback. Anything else is a bug and tracebacks.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """One or more problems the user must fix; ``problems`` holds one line each."""

    kind = "error"  # the printed prefix: "<kind> error: <problem>"

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def lines(self) -> list[str]:
        return [f"{self.kind}: {problem}" for problem in self.problems]


class ConfigError(UserError):
    """A configuration file, override or value does not fit the run (or the machine)."""

    kind = "config error"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> str:
    """``unknown stage 'mimm' (did you mean mim?); choose one of [...]``."""
    choices = sorted(choices)
    return f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose one of {choices}"


def launcher_rank(environ: dict[str, str] | None = None) -> int:
    """This process's global rank as torchrun (RANK) or srun (SLURM_PROCID) set it; 0 alone.
    torchrun's variable wins, as in ``platform.distributed.dist_env_from_environ``."""
    env = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def report_user_error(error: UserError, stream=None) -> int:
    """Print ``error``'s lines on global rank 0 (every rank validated the same config, so the
    others stay quiet) and return the exit code every rank uses."""
    if launcher_rank() == 0:
        stream = stream or sys.stderr
        for line in error.lines():
            print(line, file=stream)
        stream.flush()
    return EXIT_USER_ERROR
