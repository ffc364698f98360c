"""How every absl command runs: `cli.run(main)` in place of `app.run(main)`.

absl's defaults do not suit a user at a terminal or a script checking exit codes:
  * an error the user can fix (`USER_ERRORS`: `errors.UserError`, a bad value, a missing
    file) becomes one line on stderr, `error: <message>`, exit status 1, no traceback. With
    `--verbosity=1` the traceback is logged too, for whoever debugs it;
  * a bad flag, a `--config.key` override naming no key (with ml_collections' "did you mean")
    and a config file that cannot be loaded are one line as well, before `main` runs (absl
    prints tracebacks for the last two and two lines for the first);
  * `--help`, `--helpshort`, `--helpfull` and `--helpxml` exit 0: asking for help is no error
    (absl exits 1, which breaks `cmd --help && ...` in scripts).

Flags are spelled with underscores (`--allow_pickle`), absl's style, in every command.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from realm_jax import compile_cache
from realm_jax.errors import UserError

# Exceptions whose message is all a user needs. ValueError is in: this code base raises it
# for bad settings and inputs, naming the setting or file (a programming error rarely is one;
# --verbosity=1 shows its traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError)
_HELP_FLAGS = (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag, app.HelpXMLFlag)


def one_line(error: BaseException) -> str:
    """An exception's message on one line. An exception wrapping another (ml_collections'
    AttributeError(KeyError)) gives the inner one's; a KeyError's has no quotes added."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with `USER_ERRORS` turned into `SystemExit("error: ...")` (stderr, status 1)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            logging.debug("the error below, with its traceback", exc_info=True)
            raise SystemExit(f"error: {one_line(e)}") from None

    return wrapped


class _ExitZero:
    """Mixed into absl's help flags: print the help as they do, then exit 0, not 1."""

    def parse(self, argument: str) -> None:
        try:
            super().parse(argument)  # type: ignore[misc]
        except SystemExit:
            raise SystemExit(0) from None


def _help_exits_zero() -> None:
    """Replace absl's help flags (already defined by `app.run`) by ones that exit 0."""
    for absl_flag in _HELP_FLAGS:
        flag = type(absl_flag.__name__, (_ExitZero, absl_flag), {})()
        if isinstance(flags.FLAGS[flag.name], _ExitZero):
            return  # done already (flags parsed twice in one process)
        for name in (flag.name, flag.short_name):
            if name and name in flags.FLAGS:
                delattr(flags.FLAGS, name)
        flags.DEFINE_flag(flag)


def _override_error(error: BaseException, argv: Sequence[str]) -> str:
    """ml_collections' error for a `--config.a.b` override that names no key, as one line
    naming the flag (it names only the key, on two lines with its suggestion)."""
    message = one_line(error)
    key = re.match(r"'?([^' ;]+)'?", message)
    named = [a.split("=")[0] for a in argv if a.startswith("--") and "." in a.split("=")[0]
             and key is not None and key.group(1) in a.split("=")[0].split(".")]
    where = " / ".join(named) or "a --config.* override"
    return f"{where}: no such config key {message}"


def _check_configs_loaded() -> None:
    """A config flag whose file could not be loaded fails only when read: fail here."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if flag.value is None:  # not given
            continue
        try:
            filename = config_flags.get_config_filename(flag)
        except TypeError:  # not a config flag
            continue
        try:
            getattr(flag.value, "_any_attribute", None)  # an unloadable config raises here
        except OSError as e:
            cause = one_line(e.__cause__ or e).split("; ")[-1]
            raise SystemExit(f"error: --{name}={filename}: cannot load the config file: "
                             f"{cause}") from None


def _shipped_configs(argv: Sequence[str]) -> list[str]:
    """`--config configs/x.py[:arg]` that does not exist from here → the configs this package
    carries (`defaults.find_config`): commands work from any directory and from a wheel."""
    from realm_jax import defaults

    out = list(argv)
    for i, a in enumerate(out):
        value_at = i if a.startswith("--config=") else i + 1 if a == "--config" else None
        if value_at is None or value_at >= len(out):
            continue
        prefix = "--config=" if value_at == i else ""
        path, colon, arg = out[value_at][len(prefix):].partition(":")
        if not os.path.exists(path):
            try:
                path = str(defaults.find_config(path))
            except FileNotFoundError:
                continue  # absl's loader names the missing file (`_check_configs_loaded`)
            out[value_at] = f"{prefix}{path}{colon}{arg}"
    return out


def parse_flags(argv: Sequence[str]) -> list[str]:
    """`app.run`'s flags parser: absl's, with one-line errors and help that exits 0."""
    _help_exits_zero()
    argv = _shipped_configs(argv)
    try:
        rest = flags.FLAGS(list(argv))
    except flags.Error as e:
        raise SystemExit(f"error: {one_line(e)} (--helpshort lists the flags)") from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no key
        raise SystemExit(f"error: {_override_error(e, argv)}") from None
    _check_configs_loaded()
    return rest


class _NoLibraryInfo:
    """A logging filter: orbax's INFO lines out (a 3-step run logged ~160 of them, every
    save and restore in its internal steps), its warnings and errors kept."""

    def filter(self, record: Any) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _quiet_libraries(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """`main` with `_NoLibraryInfo` on absl's logger (orbax logs through absl.logging),
    unless --verbosity >= 1 (debug)."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> Any:
        if logging.get_verbosity() < logging.DEBUG:
            logging.get_absl_logger().addFilter(_NoLibraryInfo())
        return main(argv)

    return wrapped


def run(main: Callable[[list[str]], Any]) -> None:
    """`app.run(main)` the way every realm_jax command runs (module docstring), with XLA's
    persistent compilation cache on (`compile_cache`) and orbax's INFO lines out of the log
    (`_NoLibraryInfo`)."""
    compile_cache.enable()
    try:
        app.run(_quiet_libraries(one_line_errors(main)), flags_parser=parse_flags)
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            _exit_now(e.code)
        raise


def _exit_now(message: str) -> None:
    """Print the one line and leave without the interpreter's shutdown. Why: what a failed
    operation leaves running prints tracebacks while Python shuts down — orbax's pending
    reads of an unreadable checkpoint ("Exception ignored in: <coroutine …>") and
    TensorStore callbacks into a closed event loop ("Event loop is closed") — after the line
    that already said why. Every `finally` of the command has run by now."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    logging.flush()
    os._exit(1)
