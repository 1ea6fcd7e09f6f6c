"""A dependency-free progress bar: one redrawn line on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label = max(int(total), 1), label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled
        self.n, self.tokens, self.info = 0, 0, ""
        self.start = self.last = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.draw(force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
        return False

    def advance(self, n: int = 1, tokens: int | None = None, info: str = "") -> None:
        self.n += n
        if tokens is not None:
            self.tokens = tokens
        if info:
            self.info = info
        self.draw()

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        el = now - self.start
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(frac * 24)
        eta = el / frac - el if frac > 0 else 0
        rate = f" {self.tokens / el:.0f} tok/s" if self.tokens and el > 0 else ""
        line = (f"{self.label} [{bar:<24}] {self.n}/{self.total} {el:.0f}s<{eta:.0f}s{rate}"
                f"{' | ' + self.info if self.info else ''}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
