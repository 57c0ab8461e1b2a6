"""Reading user-supplied text files line by line (prompt files, JSON-lines inputs), with errors
that name the file, the line and the byte instead of a bare UnicodeDecodeError."""
from __future__ import annotations

from ascendspeed.errors import ConfigError



def read_utf8_lines(path: str, name: str | None = None,
                    error: type[Exception] = ConfigError) -> list[tuple[int, str]]:
    """(line number, text without its line ending) for every line of the UTF-8 file `path`;
    `name` is how messages call the file (default: the path), `error` what they raise."""
    name = name or path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as failure:
        raise error(f"{name}: cannot read ({failure.strerror})") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append((number, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as failure:
            raise error(f"{name}: line {number} is not valid UTF-8 (byte {failure.start + 1} "
                        f"of the line)") from None
    return lines
