"""Progress on a terminal (kiln.host.progress): a live line for long work, nothing when not a terminal."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from kiln.host.progress import activity


def test_on_a_terminal_the_live_line_shows_the_label_and_the_latest_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with activity("boot amd64/bios (tcg)", console=console) as note:
        note("[    1.234] Linux version 6.1.0")
        note("   ")  # blank lines do not replace what is shown
        time.sleep(0.8)  # the line is redrawn twice a second
    text = out.getvalue()
    assert "boot amd64/bios (tcg):" in text and "Linux version 6.1.0" in text


def test_elsewhere_nothing_is_drawn(capsys: pytest.CaptureFixture[str]) -> None:
    with activity("bootstrap debian bookworm amd64") as note:  # stderr is pytest's capture, not a terminal
        note("Unpacking libc6")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_guests_control_characters_and_a_files_markup_stay_off_the_terminal() -> None:
    out = io.StringIO()
    with activity("boot", console=Console(file=out, force_terminal=True, width=100)) as note:
        note("evil\x9b31m\u202eline\x07")
        time.sleep(0.8)
    assert "evil31mline" in out.getvalue() and "\u202e" not in out.getvalue() and "\x9b" not in out.getvalue()
