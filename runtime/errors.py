"""User-facing errors and the CLI wrapper that turns them into one clear line.

Every module raises `CxrError` for a problem the user can fix (bad flag, bad
file, bad config). The three CLIs run their commands through `cli_errors`, so
such an error prints `error: <message>` on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from typing import Any, Callable, Sequence, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class CxrError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def cli_errors(fn: F) -> F:
    """Decorator for click commands: CxrError -> one line on stderr + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CxrError as e:
            _close_progress_bars()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _close_progress_bars() -> None:
    """An error raised mid-loop (a full disk during a save) finds a tqdm bar still drawn, the
    cursor at its end: close it first (its final state and a newline), so the error line stands
    alone and last."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)   # only if loaded: never imported here
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class OneLineGroup(click.Group):
    """A click group whose usage errors (bad flag value, unknown option) are one line too:
    `error: Invalid value for '--seed': '1.5' is not a valid integer.`, exit 2, like CxrError."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:  # click's own signature (so its overloads type-check); always non-standalone: we exit below
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except click.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":        # bare `cxr-runtime`: show the help
                e.show()
                sys.exit(e.exit_code)
            print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)


TRAIN_MODULES = ("torch", "deepspeed", "denoising_diffusion_pytorch", "safetensors", "onnx")


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """CxrError naming the pip extra when a module of an optional install is missing.

    find_spec only looks the module up: nothing heavy (torch) is imported here."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CxrError(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                       f"pip install 'cxr-ddpm[{extra}]'")
