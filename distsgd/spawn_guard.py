"""The ``if __name__ == "__main__":`` guard that starting worker processes needs.

Worker processes are started with multiprocessing's "forkserver" or "spawn"
(`distsgd.forkserver`): either way each child imports the user's main script again (the server
does not), so a script that calls ``distsgd.train(..., backend="processes")`` at its top level
would start the run again in every child (multiprocessing then fails with a RuntimeError about
the bootstrapping phase, and the run with "worker 0 died"). `check_main_guard` says instead, in
one line, what to add: in the parent before any child starts, by finding the line of the main
script that leads to this call outside such a guard; in a child (a case the parent could not
see), by multiprocessing's own flag that it is still importing the main module.
"""

from __future__ import annotations

import ast
import multiprocessing.process
import sys
from pathlib import Path
from typing import NoReturn

_ADVICE = ('put the code that starts the run under if __name__ == "__main__": (each worker '
           "process imports the main script again)")


def check_main_guard(what: str) -> None:
    """End the script with one line on stderr and exit status 2 if `what` was called from the
    main script's top level outside a ``__main__`` guard (or in a child process that is still
    importing it). An exit, not an exception: the call is the script's own top level, and a
    traceback would bury the line."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        _exit(f"{what} was called while a worker process imported the main script; {_ADVICE}")
    line = _unguarded_line()
    if line is not None:
        _exit(f"{what} is called at line {line} of {_main_file()}; {_ADVICE}")


def _exit(message: str) -> NoReturn:
    print(f"distsgd: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _main_file() -> str | None:
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None)


def _unguarded_line() -> int | None:
    """The line of the main script's top level that is running now, if it is outside a
    ``if __name__ == "__main__":`` block; None if guarded, or if the main script is not on the
    stack (an interactive session, ``python -c``, a test runner) or cannot be read."""
    main, path = sys.modules.get("__main__"), _main_file()
    if main is None or path is None:
        return None
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if name == "__main__" or name.endswith(".__main__"):
        return None  # python -m package: multiprocessing does not import it again
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main)
                                     and frame.f_code.co_name == "<module>"):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return None
    return line


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}
