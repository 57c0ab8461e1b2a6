"""Progress of long work (preprocessing, index builds, checkpoint conversion), on stderr.

On a terminal one line is redrawn in place with `\\r`: a bar, the count, the rate and the time
left. Anywhere else (a log file, a pipe) a plain line is written every `interval` seconds (10 by
default) and once at the end, so a log stays short. Work of unknown size shows counts and rate,
without a bar or an estimate. The rate is the average since the start; the time left is the
remaining work at that rate.

Library functions take a progress *factory*, called as `factory(total, what, unit)`: `Progress`
to show it, `NoProgress` (the default) to show nothing. Output a library function prints while a
bar is drawn goes after `bar.clear()`, so it does not land on the bar's line.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

TTY_INTERVAL = 0.2     # seconds between redraws on a terminal
PLAIN_INTERVAL = 10.0  # seconds between lines elsewhere
BAR_WIDTH = 24


class Progress:
    """`total` units of work (None: unknown) called `what`, counted in `unit` ("B" shows bytes
    in kB/MB/GB). `update(n)` adds n done units; `close()` writes the final line."""

    def __init__(self, total: float | None, what: str, unit: str = "items", *,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None, tty: bool | None = None):
        self.total = None if total is None else max(0, total)
        self.what, self.unit = what, unit
        self.count = 0
        self.detail = ""
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval = interval if interval is not None else (
            TTY_INTERVAL if self.tty else PLAIN_INTERVAL)
        self._clock = clock
        self._start = clock()
        self._last_drawn: float | None = None
        self._drawn_width = 0  # characters of the bar now on the terminal's line
        self.closed = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(success=exc_type is None)

    # ------------------------------------------------------------------ updates
    def update(self, n: float = 1, detail: str | None = None, force: bool = False) -> None:
        """Add `n` done units (and replace the detail text); draw if the interval has passed
        since the last line (on a terminal the first update draws at once), or if `force`."""
        self.count += n
        if detail is not None:
            self.detail = detail
        now = self._clock()
        if self.tty and self._last_drawn is None:
            due = True
        else:
            since = self._last_drawn if self._last_drawn is not None else self._start
            due = now - since >= self.interval
        if force or due:
            self._draw(now, final=False)

    def clear(self) -> None:
        """Blank the bar's line on a terminal (the next update redraws it)."""
        if self.tty and self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self.stream.flush()
            self._drawn_width = 0

    def close(self, success: bool = True) -> None:
        """The final line (`done in ...`) when `success`; otherwise only end the terminal's line,
        so that an error message starts on its own."""
        if self.closed:
            return
        self.closed = True
        if success:
            self._draw(self._clock(), final=True)
        if self.tty and self._drawn_width:
            self.stream.write("\n")
            self.stream.flush()

    # ------------------------------------------------------------------ numbers
    def elapsed(self, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - self._start

    def rate(self, now: float | None = None) -> float | None:
        """Units per second since the start; None before any time has passed."""
        elapsed = self.elapsed(now)
        return self.count / elapsed if elapsed > 0 else None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the average rate; None with an unknown total or no rate yet."""
        rate = self.rate(now)
        if self.total is None or not rate:
            return None
        return max(0.0, self.total - self.count) / rate

    # ------------------------------------------------------------------ lines
    def line(self, now: float | None = None, final: bool = False) -> str:
        """The text of one line: the bar's on a terminal, else the plain one."""
        now = self._clock() if now is None else now
        amount = format_amount(self.count, self.total, self.unit)
        rate = self.rate(now)
        parts = [format_rate(rate, self.unit) if rate else None]  # none before the first unit
        if final:
            parts.append(f"done in {format_duration(self.elapsed(now))}")
        else:
            eta = self.eta(now)
            if self.total is None or not self.tty:
                parts.append(f"elapsed {format_duration(self.elapsed(now))}")
            if self.total is not None:
                parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
        parts.append(self.detail)  # last: what a narrow terminal cuts first
        tail = ", ".join(p for p in parts if p)
        if self.total is None:
            return f"{self.what}: {amount}, {tail}"
        fraction = min(1.0, self.count / self.total) if self.total else 1.0
        if self.tty:
            filled = int(round(BAR_WIDTH * fraction))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            return f"{self.what} {100 * fraction:3.0f}% [{bar}] {amount}, {tail}"
        return f"{self.what}: {amount} ({100 * fraction:.0f}%), {tail}"

    def _draw(self, now: float, final: bool) -> None:
        text = self.line(now, final)
        if self.tty:
            columns = _columns(self.stream)
            if columns:  # never the last column: the cursor would wrap
                text = text[:columns - 1]
            self.stream.write("\r" + text.ljust(self._drawn_width))
            self._drawn_width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_drawn = now


class NoProgress:
    """A factory with Progress's interface that shows nothing (the library default)."""

    def __init__(self, total=None, what: str = "", unit: str = "items", **_):
        self.total, self.what, self.unit = total, what, unit

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def update(self, n: float = 1, detail: str | None = None, force: bool = False) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self, success: bool = True) -> None:
        pass


# ---------------------------------------------------------------------------- formatting
_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))


def _byte_scale(reference: float) -> tuple[float, str]:
    for prefix, size in _PREFIXES:
        if reference >= size:
            return size, prefix
    return 1.0, ""


def format_amount(count: float, total: float | None, unit: str) -> str:
    """`12/48 tensors`, `1,234 entries`; bytes in one decimal unit: `0.25/1.50 GB`."""
    if unit == "B":
        size, prefix = _byte_scale(total if total else count)
        digits = 2 if size > 1 else 0
        done = f"{count / size:.{digits}f}"
        return (f"{done}/{total / size:.{digits}f} {prefix}B" if total is not None
                else f"{done} {prefix}B")
    done = f"{count:,.0f}"
    return f"{done}/{total:,.0f} {unit}" if total is not None else f"{done} {unit}"


def format_rate(rate: float, unit: str) -> str:
    """`3.25 tensors/s`, `12.3 MB/s`, `1,250,000 entries/s`."""
    prefix = ""
    if unit == "B":
        size, prefix = _byte_scale(rate)
        rate = rate / size
    if rate >= 100:
        text = f"{rate:,.0f}"
    else:
        text = f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"
    return f"{text} {prefix}{unit}/s"


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h03m`, `4d07h`."""
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream) -> int | None:
    """The terminal's width; None when it says none (0, as a new pseudo-terminal) or has no
    file descriptor to ask."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        return None
