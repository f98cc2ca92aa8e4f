"""A stream that rich takes for a terminal, so that a live progress line is redrawn on it as on a real one."""

import io
import re


class FakeTerminal(io.StringIO):
    """Sets, through `monkeypatch`, the environment in which rich draws in place (no dumb TERM),
    200 columns wide so that no line is cut."""

    def __init__(self, monkeypatch):
        super().__init__()
        monkeypatch.setenv("TERM", "xterm")
        monkeypatch.setenv("COLUMNS", "200")
        monkeypatch.delenv("TTY_COMPATIBLE", raising=False)

    def isatty(self):
        return True

    def drawn_lines(self) -> list[str]:
        """The progress lines drawn so far, in order, without escape codes or the bar."""
        return [line.rstrip() for line in re.findall(r"step +\d+/\d+ \|[^\n\x1b]*", self.getvalue())]

    def drawn_steps(self) -> list[int]:
        return [int(line.split("/")[0].split()[-1]) for line in self.drawn_lines()]
