"""What every `python -m rlsr_ray.<command>` does around its work: --help, logging, the preset
argument, one-line errors with their exit codes, and the result printed as JSON."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

from rlsr_ray.config import preset_names


def split_preset(argv: list[str]) -> tuple[str, list[str]]:
    """(PRESET, overrides): the first argument unless it is an override; 'default' without one."""
    if argv and not argv[0].startswith("--"):
        return argv[0], argv[1:]
    return "default", list(argv)


def error_line(e: BaseException) -> str:
    """The user's line for an error. One raised inside a Ray actor (a reward term's) arrives wrapped,
    the actor's traceback in its text; the error it wraps is what the user needs."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)


def first_line(e: BaseException) -> str:
    """An error's first line for a log or a message (its type's name when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def command(argv: list[str] | None, usage: str, work: Callable[[list[str]], dict[str, Any]],
            user_errors: tuple[type[BaseException], ...], timeouts: tuple[type[BaseException], ...] = ()) -> int:
    """Run work(arguments); a user error (bad config, data, model, ...) is one line and exit 2, a
    timeout one line and exit 1; the result is printed as JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage.format(presets=", ".join(preset_names())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = work(argv)
    except user_errors as e:
        print(f"rlsr_ray: error: {error_line(e)}", file=sys.stderr)
        return 2
    except timeouts as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
