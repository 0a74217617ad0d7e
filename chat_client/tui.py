"""The full-screen terminal UI: a message pane, a status bar and an input line.

prompt_toolkit redraws the whole screen from the model, so an incoming message can never
break the line being typed. Text from the network is sanitized and passed as plain
``(style, text)`` fragments: never through ``ANSI()`` or ``HTML()``, which would interpret it.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.data_structures import Point
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.output import Output
from prompt_toolkit.styles import Style
from prompt_toolkit.utils import get_cwidth

from chat_client.model import SERVER_WINDOW, ChatModel, Entry, EntryKind
from chat_client.sanitize import clean
from chat_protocol.names import nick_key

NICK_COLOURS = [
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
]

STYLE = Style.from_dict(
    {
        "status": "reverse",
        "status.offline": "bg:ansired fg:ansiwhite",
        "time": "ansibrightblack",
        "notice": "ansibrightblack italic",
        "gap": "ansiyellow bold",
        "pending": "ansibrightblack",
        "mention": "bold reverse",
        "direct": "ansimagenta bold",
        "prompt": "bold",
    }
)


def nick_style(nick: str) -> str:
    """The same colour for a nick on every screen and every run."""
    return "fg:" + NICK_COLOURS[zlib.crc32(nick_key(nick).encode()) % len(NICK_COLOURS)]


def wrap_cells(text: str, first: int, rest: int) -> list[str]:
    """Cut text into pieces at most ``first`` (then ``rest``) terminal cells wide.

    The pane wraps long lines itself rather than leaving it to the terminal widget: a
    single logical line taller than the window would otherwise push everything else
    out of view.
    """
    pieces: list[str] = []
    current: list[str] = []
    width, limit = 0, max(1, first)
    for char in text:
        cells = get_cwidth(char)
        if width + cells > limit and current:
            pieces.append("".join(current))
            current, width, limit = [], 0, max(1, rest)
        current.append(char)
        width += cells
    pieces.append("".join(current))
    return pieces


def render_entry(entry: Entry, width: int = 0) -> StyleAndTextTuples:
    """One entry as styled fragments: several lines for newlines, or wrapped to ``width``."""
    stamp = time.strftime("%H:%M", time.localtime(entry.ts))
    out: StyleAndTextTuples = [("class:time", stamp + " ")]
    if entry.kind in (EntryKind.NOTICE, EntryKind.GAP):
        style = "class:gap" if entry.kind == EntryKind.GAP else "class:notice"
        marker = "~~ " if entry.kind == EntryKind.GAP else "-- "
        out.append((style, marker))
        body_lines, style_of_body = [clean(entry.text)], style
    else:
        nick = clean(entry.nick)
        body_lines = clean(entry.text, keep_newlines=True).split("\n")
        if entry.direct:
            out.append(("class:direct", "[dm] "))
        if entry.action:
            out += [("", "* "), (nick_style(nick), nick), ("", " ")]
        else:
            out += [("", "<"), (nick_style(nick), nick), ("", "> ")]
        style_of_body = "class:pending" if entry.kind == EntryKind.PENDING else ""
        if entry.mention:
            style_of_body = "class:mention"
    indent = " " * 6
    if width:
        prefix = sum(get_cwidth(c) for _, text, *_ in out for c in text)
        wrapped = wrap_cells(body_lines[0], width - prefix, width - len(indent))
        for line in body_lines[1:]:
            wrapped += wrap_cells(line, width - len(indent), width - len(indent))
        body_lines = wrapped
    for n, line in enumerate(body_lines):
        if n:
            out.append(("", "\n" + indent))
        out.append((style_of_body, line))
    if entry.kind == EntryKind.PENDING:
        out.append(("class:pending", "  (sending…)"))
    return out


class ChatUI:
    def __init__(
        self,
        model: ChatModel,
        submit: Callable[[str], None],
        completions: Callable[[], list[str]],
        status_text: Callable[[], str],
        *,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.model = model
        self.submit = submit
        self.status_text = status_text
        self.scroll = 0  # lines up from the bottom
        self.buffer = Buffer(
            multiline=False,
            accept_handler=self._accept,
            completer=WordCompleter(completions, WORD=True, ignore_case=True),
            complete_while_typing=False,
            history=InMemoryHistory(),
        )
        self._line_count = 0
        pane = Window(
            FormattedTextControl(self._pane, get_cursor_position=self._cursor, focusable=False),
            wrap_lines=True,
            always_hide_cursor=True,
        )
        status = Window(FormattedTextControl(self._status), height=1, style="class:status")
        prompt = VSplit(
            [
                Window(FormattedTextControl(self._prompt), dont_extend_width=True),
                Window(BufferControl(self.buffer)),
            ],
            height=1,
        )
        self.app: Application[None] = Application(
            layout=Layout(HSplit([pane, status, prompt]), focused_element=self.buffer),
            key_bindings=self._bindings(),
            style=STYLE,
            full_screen=True,
            refresh_interval=1.0,  # the "reconnecting in Ns" countdown
            input=input,
            output=output,
        )
        model.on_mention = self._mention

    async def run(self) -> None:
        await self.app.run_async()

    def refresh(self) -> None:
        self.app.invalidate()

    def exit(self) -> None:
        if self.app.is_running and not self.app.is_done:
            self.app.exit()

    # --- drawing ---------------------------------------------------------------------------

    def _pane(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        lines = 0
        width = self.app.output.get_size().columns if self.app.is_running else 0
        for entry in self.model.window(self.model.active).lines():
            if out:
                out.append(("", "\n"))
            fragments = render_entry(entry, width)
            lines += 1 + sum(text.count("\n") for _, text, *_ in fragments)
            out += fragments
        self._line_count = lines
        return out

    def _cursor(self) -> Point:
        # The pane scrolls to keep this "cursor" in view: the last line, or higher up.
        return Point(0, max(0, self._line_count - 1 - self.scroll))

    def _status(self) -> StyleAndTextTuples:
        model = self.model
        state = self.status_text()
        unread = [
            f"{name} {w.unread}"
            for name, w in model.windows.items()
            if w.unread and name != model.active
        ]
        parts = [clean(model.nick), model.active, state]
        if unread:
            parts.append("unread: " + " ".join(unread))
        if self.scroll:
            parts.append(f"scrolled up {self.scroll}")
        style = "class:status.offline" if state != "connected" else ""
        return [(style, " " + " | ".join(parts) + "   /help  PgUp/PgDn  Ctrl-N/P ")]

    def _prompt(self) -> StyleAndTextTuples:
        where = self.model.active if self.model.active != SERVER_WINDOW else "server"
        return [("class:prompt", f"[{where}] ")]

    # --- input -----------------------------------------------------------------------------

    def _accept(self, buffer: Buffer) -> bool:
        text = buffer.text
        self.scroll = 0
        if text.strip():
            self.submit(text)
        return False  # clears the line; history keeps it

    def _mention(self, entry: Entry) -> None:
        if self.app.is_running:
            self.app.output.bell()

    def _bindings(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("c-c")
        @kb.add("c-q")
        def _quit(event: KeyPressEvent) -> None:
            self.submit("/quit")

        @kb.add("c-d")
        def _eof(event: KeyPressEvent) -> None:
            if not self.buffer.text:
                self.submit("/quit")

        @kb.add("pageup")
        def _up(event: KeyPressEvent) -> None:
            height = event.app.output.get_size().rows - 2
            self.scroll = min(max(0, self._line_count - 1), self.scroll + max(1, height - 1))

        @kb.add("pagedown")
        def _down(event: KeyPressEvent) -> None:
            height = event.app.output.get_size().rows - 2
            self.scroll = max(0, self.scroll - max(1, height - 1))

        @kb.add("c-n")
        @kb.add("escape", "right")
        def _next(event: KeyPressEvent) -> None:
            self.scroll = 0
            self.model.cycle(1)

        @kb.add("c-p")
        @kb.add("escape", "left")
        def _previous(event: KeyPressEvent) -> None:
            self.scroll = 0
            self.model.cycle(-1)

        @kb.add("tab")
        def _complete(event: KeyPressEvent) -> None:
            if self.buffer.complete_state:
                self.buffer.complete_next()
            else:
                self.buffer.start_completion(select_first=True)

        return kb
