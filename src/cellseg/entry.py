"""Entry-point glue for the stage scripts: a user's mistake ends with one clear line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from cellseg import CellsegError


def run(main: Callable[[], object]) -> None:
    """Call ``main``; on a user error print ``error: <message>`` and exit 1 (CELLSEG_DEBUG=1 shows the traceback).

    User errors are :class:`cellseg.CellsegError` (bad data, bad params, missing weights, a diverged loss) and
    missing files; their messages already name the file or key and what is wrong.
    """
    try:
        main()
    except (CellsegError, FileNotFoundError) as err:
        if os.environ.get("CELLSEG_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
