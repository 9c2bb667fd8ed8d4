"""``mgpu chat`` driven through a pseudo-terminal, as a person would use it.

Each reply must be the greedy reply of the offline engine to the whole conversation so far, which
shows that the client keeps the history and sends it back each turn.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgpu.chat import PROMPT, sanitize
from tests.server.conftest import MAX_MODEL_LEN, REPO, Reference, ServerProcess

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """A command on a pseudo-terminal: type lines, read the screen text.

    Args:
        args: the ``mgpu`` arguments (``python -m mgpu.cli`` is prepended).
    """

    def __init__(self, args: list[str]):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mgpu.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env={**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """Read until ``marker`` appears; returns the text before it and consumes both."""
        deadline = time.monotonic() + timeout
        while marker not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {marker!r} on the terminal; it shows:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the program exited and closed the terminal
                    data = b""
                if not data:
                    raise EOFError(f"the program exited; the terminal shows:\n{self.screen}")
                text = data.decode("utf-8", errors="replace")
                self.screen += _ESCAPES.sub("", text).replace("\r", "")
        before, self.screen = self.screen.split(marker, 1)
        return before

    def type(self, text: str) -> None:
        """Type ``text`` (include ``\\n`` to press Enter)."""
        os.write(self.master, text.encode())

    def close(self) -> int | None:
        """Wait for the program to exit (killing it after 30 s); returns its status."""
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            os.close(self.master)


def _turn(term: Terminal, line: str) -> str:
    """Type one message and return the reply shown before the next prompt."""
    term.type(line + "\n")
    term.read_until(line + "\n")  # the terminal's echo of what was typed
    return term.read_until(PROMPT).removesuffix("\n\n")


def test_two_turns_against_a_server(server_tp1: ServerProcess, reference: Reference) -> None:
    term = Terminal(["chat", "--url", server_tp1.url, "--temperature", "0", "--max-tokens", "8"])
    try:
        banner = term.read_until(PROMPT)
        assert "Chatting with tiny" in banner
        history = [{"role": "user", "content": "The quick brown fox"}]
        first = reference.chat(history, 8)
        assert _turn(term, history[0]["content"]) == sanitize(first)
        history += [
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and the lazy dog"},
        ]
        assert _turn(term, "and the lazy dog") == sanitize(reference.chat(history, 8))
        term.type("/bye\n")
    finally:
        status = term.close()
    assert status == 0


def test_in_process_engine_and_end_of_input(model_dir: Path, reference: Reference) -> None:
    term = Terminal(
        [
            *("chat", "--model", str(model_dir), "--device", "cpu"),
            *("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4"),
            *("--temperature", "0", "--max-tokens", "6"),
        ]
    )
    try:
        term.read_until(PROMPT)
        history = [{"role": "user", "content": "Tensor parallelism"}]
        assert _turn(term, "Tensor parallelism") == sanitize(reference.chat(history, 6))
        term.type("\x04")  # Ctrl-D
    finally:
        status = term.close()
    assert status == 0


@pytest.mark.parametrize("text", ["a\x1b[2Jb\x07", "tab\tand\nnewline\x9b"])
def test_sanitize_strips_terminal_controls(text: str) -> None:
    cleaned = sanitize(text)
    assert not any(ord(c) < 32 and c not in "\t\n" for c in cleaned)
    assert "\x9b" not in cleaned
