"""A one-line progress display on a terminal; plain log lines otherwise (training and pretraining)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ProgressDisplay:
    """`update(it, text)`: a bar on stderr when `enabled`, else the line `[<label>] it=<it>/<total> <text>`
    passed to `emit` (default: print to stdout)."""

    def __init__(self, total: int, enabled: bool, *, label: str = "train",
                 emit: Callable[[str], None] | None = None) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.emit = emit or (lambda line: print(line, flush=True))

    def update(self, it: int, text: str) -> None:
        if self.enabled:
            done = int(30 * it / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it}/{self.total} {text}\033[K")
            sys.stderr.flush()
        else:
            self.emit(f"[{self.label}] it={it}/{self.total} {text}")

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
