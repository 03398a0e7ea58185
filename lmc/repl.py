"""The REPL of `lmc chat`, the same for a local model and for a server URL.

One line is one message; a message that starts with \"\"\" runs until a line that ends with \"\"\"
(multi-line input). `/reset` forgets the conversation (the system prompt stays), `/help` lists
the commands, `exit` or end of input quits. On a terminal, lines are edited with readline and
the input history is kept in $LMC_CACHE/chat_history across sessions; from a pipe, nothing but
the replies is printed.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

HELP = ('one line is one message; """ starts a multi-line message that ends at a line ending with """\n'
        "/image PATH  attach an image to the next message (vision-language models)\n"
        "/reset  forget the conversation (the system prompt stays)\n"
        "/help   this text\n"
        "exit    quit (or Ctrl-D)")
HISTORY_LENGTH = 1000
MAX_MESSAGE_CHARS = 16 * 1024 * 1024  # a message (a line or a """ block) read from a pipe; more is refused

# (history without the system prompt, ending with the new user message) -> the history to keep
# (the reply appended, older turns perhaps dropped; or the message removed when it was refused)
Turn = Callable[[list[dict]], list[dict]]


class LineReader:
    """Lines from stdin: readline with a persistent history on a terminal, plain reads from a pipe."""

    def __init__(self, history_file: Path | None):
        self.interactive = sys.stdin.isatty()
        self.history_file = history_file if self.interactive else None
        if self.history_file is not None:
            import readline  # input() now edits lines and recalls history

            readline.set_history_length(HISTORY_LENGTH)
            if self.history_file.is_file():
                readline.read_history_file(self.history_file)

    def line(self, prompt: str) -> str | None:
        """One line without its newline; None at end of input."""
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                click.echo()
                return None
        line = sys.stdin.readline(MAX_MESSAGE_CHARS + 2)  # bounded: a line without end (/dev/zero) is not read forever
        if not line:
            return None
        line = line.removesuffix("\n")
        _within_limit(len(line))
        return line

    def message(self) -> str | None:
        """The next message (a line or a \"\"\" block); None at end of input."""
        first = self.line("\n>>> ")
        if first is None or not first.lstrip().startswith('"""'):
            return first
        text = first.lstrip()[3:]
        lines = []
        size = 0
        while not (text.rstrip().endswith('"""') and (lines or len(first.strip()) >= 6)):
            lines.append(text)
            size += len(text) + 1
            _within_limit(size)
            text = self.line("... ")
            if text is None:
                return "\n".join(lines)
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")

    def close(self) -> None:
        if self.history_file is not None:
            import readline

            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self.history_file)


def _within_limit(chars: int) -> None:
    """A message from a pipe longer than MAX_MESSAGE_CHARS is one LmcError line (no session holds it anyway)."""
    if chars > MAX_MESSAGE_CHARS:
        from lmc.errors import LmcError

        raise LmcError(f"a message on standard input is over {MAX_MESSAGE_CHARS} characters; no session holds it: "
                       "send shorter messages (one line, or a \"\"\" block)")


def run(turn: Turn, history_file: Path | None) -> None:
    """Read messages and answer them with `turn` until `exit` or the end of input."""
    reader = LineReader(history_file)
    history: list[dict] = []
    images: list[dict] = []  # image parts waiting for the next message
    try:
        while True:
            text = reader.message()
            if text is None or text.strip() == "exit":
                break
            if not text.strip():
                continue
            if text.strip() == "/reset":
                history = []
                click.echo("(the conversation is reset)", err=True)
                continue
            if text.strip() == "/help":
                click.echo(HELP, err=True)
                continue
            if text.strip().startswith("/image"):
                images += _image_part(text.strip()[len("/image"):].strip())
                continue
            content = images + [{"type": "text", "text": text}] if images else text
            images = []
            history = turn(history + [{"role": "user", "content": content}])
    finally:
        reader.close()


def _image_part(path: str) -> list[dict]:
    """`/image PATH`: the file as an image_url part with a data URL (sent as is to a server); [] after saying
    why when it is not a readable image."""
    import base64
    import mimetypes

    from lmc.errors import LmcError
    from lmc.vl import load_image

    if not path:
        click.echo("usage: /image PATH", err=True)
        return []
    try:
        load_image(path)  # decodable, within the bounds
        data = Path(path).read_bytes()
    except (LmcError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        return []
    click.echo(f"(image {path} attached to the next message)", err=True)
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return [{"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}]
