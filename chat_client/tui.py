"""The full-screen terminal UI: a window list, the message pane, a status bar, the input.

prompt_toolkit redraws the whole screen from the model, so an incoming message can never
break the line being typed. The pane is laid out here, line by line, rather than left to
a scrolling widget: that is what makes PgUp move a whole page from the first press, keeps
the view still while new lines arrive below it, and lets PgUp at the top load older
history by itself. Text from the network reaches the screen only through
:mod:`chat_client.render`, which sanitizes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.layout.dimension import Dimension
from prompt_toolkit.output import Output
from prompt_toolkit.styles import Style

from chat_client.model import HELP_WINDOW, SERVER_WINDOW, Activity, ChatModel, Entry
from chat_client.render import (
    STYLES,
    Look,
    cells,
    close_lines,
    day_line,
    marker_line,
    render_entry,
)
from chat_client.sanitize import clean

if TYPE_CHECKING:
    from chat_client.controller import Controller

STYLE = Style.from_dict(
    {
        **STYLES,
        # The bars are reverse video (right on dark and light terminals alike); what has
        # colours of its own says "noreverse", or the bar's reverse would swap them.
        "bar": "reverse",
        "bar.offline": "noreverse bg:ansired fg:ansiwhite",
        "bar.more": "noreverse bg:ansiyellow fg:ansiblack bold",
        "bar.unsent": "noreverse bg:ansiyellow fg:ansiblack",
        "win": "reverse",
        "win.active": "noreverse bold bg:ansiblue fg:ansiwhite",
        "act.low": "reverse",
        "act.message": "reverse bold",
        "act.private": "noreverse bg:ansigreen fg:ansiblack bold",
        "act.highlight": "noreverse bg:ansimagenta fg:ansiwhite bold",
        "prompt": "bold",
        "question": "bold bg:ansiyellow fg:ansiblack",
    }
)

ACTIVITY_STYLE = {
    Activity.LOW: "class:act.low",
    Activity.MESSAGE: "class:act.message",
    Activity.PRIVATE: "class:act.private",
    Activity.HIGHLIGHT: "class:act.highlight",
}

#: The bell rings at most once in this many seconds, however many mentions arrive.
BELL_QUIET = 5.0
#: Lines the input grows to (for a multi-line paste), before it scrolls.
INPUT_LINES = 5

Line = tuple["Entry | None", int, StyleAndTextTuples]


def _control(fragments: Callable[[], StyleAndTextTuples]) -> FormattedTextControl:
    """A control showing these fragments, with every line closed (see ``close_lines``)."""
    return FormattedTextControl(lambda: close_lines(fragments()), focusable=False)


@dataclass
class View:
    """Where a window is scrolled to: a line of an entry, and how far from the top it is."""

    entry: Entry
    part: int
    offset: int


class ChatUI:
    def __init__(
        self,
        model: ChatModel,
        controller: Controller,
        *,
        seconds: bool = False,
        title: bool = False,
        input: Input | None = None,
        output: Output | None = None,
    ) -> None:
        self.model = model
        self.controller = controller
        self.seconds = seconds
        self.title = title
        self.views: dict[str, View] = {}  # absent: following the newest line
        self._opened: set[str] = set()
        self.more_below = 0
        self._last_bell = -BELL_QUIET
        self._last_title = ""
        self.buffer = Buffer(
            multiline=False,
            accept_handler=self._accept,
            completer=WordCompleter(controller.completions, WORD=True, ignore_case=True),
            complete_while_typing=False,
            history=InMemoryHistory(),
        )
        pane = Window(_control(self._pane), wrap_lines=False)
        winlist = Window(_control(self._window_list), height=1, style="class:bar")
        status = Window(_control(self._status), height=1, style="class:bar")
        prompt = VSplit(
            [
                Window(_control(self._prompt), dont_extend_width=True),
                Window(BufferControl(self.buffer)),
            ],
            height=self._input_height,
        )
        self.app: Application[None] = Application(
            layout=Layout(HSplit([winlist, pane, status, prompt]), focused_element=self.buffer),
            key_bindings=self._bindings(),
            style=STYLE,
            full_screen=True,
            refresh_interval=1.0,  # the clock and the "reconnecting in Ns" countdown
            input=input,
            output=output,
        )
        self.app.after_render += self._after_render
        model.on_mention = self._mention

    async def run(self) -> None:
        try:
            await self.app.run_async()
        finally:
            if self._last_title:
                self.app.output.clear_title()  # not left saying "compose-chat" after us
                self.app.output.flush()

    def refresh(self) -> None:
        self.app.invalidate()

    def exit(self) -> None:
        if self.app.is_running and not self.app.is_done:
            self.app.exit()

    # --- the pane ----------------------------------------------------------------------

    def _size(self) -> tuple[int, int]:
        size = self.app.output.get_size()
        return size.rows, size.columns

    def _input_height(self) -> Dimension:
        lines = min(INPUT_LINES, self.buffer.document.line_count)
        return Dimension.exact(lines)

    def pane_height(self) -> int:
        rows, _ = self._size()
        return max(1, rows - 2 - min(INPUT_LINES, self.buffer.document.line_count))

    def lines(self, name: str | None = None) -> list[Line]:
        """Every screen line of a window, oldest first, at the current width."""
        name = name or self.model.active
        window = self.model.window(name)
        _, width = self._size()
        look = Look(width, self.seconds)
        out: list[Line] = []
        if window.is_conversation:
            if window.loading:
                out.append((None, 0, marker_line("loading older messages…", width)))
            elif window.more is False:
                out.append((None, 0, marker_line(f"beginning of {clean(name)}", width)))
        day = ""
        today = time.strftime("%Y-%m-%d")
        for entry in window.lines():
            entry_day = time.strftime("%Y-%m-%d", time.localtime(entry.ts))
            if entry_day != day and (day or entry_day != today):
                out.append((None, 0, day_line(entry.ts, width)))
            day = entry_day
            for part, fragments in enumerate(render_entry(entry, look)):
                out.append((entry, part, fragments))
        return out

    def _top(self, lines: list[Line], height: int) -> int:
        """Index of the first line shown: at the bottom, or where the view is anchored."""
        bottom = max(0, len(lines) - height)
        view = self.views.get(self.model.active)
        if view is None:
            return bottom
        for index, (entry, part, _) in enumerate(lines):
            if entry is view.entry and part >= view.part:
                top = max(0, index - view.offset)
                if top >= bottom:
                    del self.views[self.model.active]
                    return bottom
                return top
        del self.views[self.model.active]  # the line is gone (cleared): follow the newest
        return bottom

    def _anchor(self, lines: list[Line], top: int, height: int) -> None:
        if top >= max(0, len(lines) - height):
            self.views.pop(self.model.active, None)
            return
        for index in range(top, min(len(lines), top + height)):
            entry, part, _ = lines[index]
            if entry is not None:
                self.views[self.model.active] = View(entry, part, index - top)
                return

    def _pane(self) -> StyleAndTextTuples:
        height = self.pane_height()
        lines = self.lines()
        self._opened &= set(self.model.windows)
        if self.model.active == HELP_WINDOW and HELP_WINDOW not in self._opened:
            self._opened.add(HELP_WINDOW)  # help is read from its first line
            self._anchor(lines, 0, height)
        top = self._top(lines, height)
        shown = lines[top : top + height]
        self.more_below = max(0, len(lines) - top - height)
        out: StyleAndTextTuples = [("", "\n" * (height - len(shown)))] if shown else []
        for n, (_, _, fragments) in enumerate(shown):
            if n:
                out.append(("", "\n"))
            out += fragments
        return out

    def scroll(self, pages: float) -> None:
        """Move the view by whole pages (negative: up); at the top, load older history."""
        height = self.pane_height()
        lines = self.lines()
        top = self._top(lines, height)
        step = round(height * abs(pages)) if abs(pages) != float("inf") else len(lines)
        new_top = max(0, top - step) if pages < 0 else top + step
        self._anchor(lines, new_top, height)
        if pages < 0 and new_top == 0:
            self.controller.load_older(self.model.active)

    def to_bottom(self) -> None:
        self.views.pop(self.model.active, None)

    # --- bars ----------------------------------------------------------------------------

    def _label(self, name: str) -> str:
        return {SERVER_WINDOW: "server", HELP_WINDOW: "help"}.get(name, clean(name))

    def _window_list(self) -> StyleAndTextTuples:
        """WeeChat's buffer list, across the top: number, name, unread count, activity."""
        _, width = self._size()
        items: list[tuple[str, str]] = []
        for number, (name, window) in enumerate(self.model.windows.items(), 1):
            text = f" {number}:{self._label(name)}"
            if window.unread:
                text += f"({window.unread})"
            text += " "
            if name == self.model.active:
                style = "class:win.active"
            else:
                style = ACTIVITY_STYLE.get(window.activity, "class:win")
            items.append((style, text))
        active = self.model.number(self.model.active) - 1
        # Keep the active window in view: drop windows from the far end first.
        first, last = 0, len(items)
        while sum(cells(t) for _, t in items[first:last]) > width - 2 and last - first > 1:
            if last - 1 > active:
                last -= 1
            else:
                first += 1
        out: StyleAndTextTuples = [("class:win", "<")] if first else []
        out += items[first:last]
        if last < len(items):
            out.append(("class:win", ">"))
        return out

    def activity_list(self) -> list[tuple[int, Activity]]:
        return [
            (number, window.activity)
            for number, (name, window) in enumerate(self.model.windows.items(), 1)
            if window.activity != Activity.NONE and name != self.model.active
        ]

    def _status(self) -> StyleAndTextTuples:
        model = self.model
        state = self.controller.status_text()
        window = model.window(model.active)
        where = f"{model.number(model.active)}:{self._label(model.active)}"
        if model.active.startswith("#") and window.joined:
            where += f" ({len(window.members)} here)"
        nick = clean(model.nick) + (" (away)" if model.away is not None else "")
        link_style = "class:bar" if state == "connected" else "class:bar.offline"
        out: StyleAndTextTuples = [
            ("class:bar", f" {time.strftime('%H:%M')} │ {nick} │ {where} │ "),
            (link_style, state),
        ]
        acts = self.activity_list()
        if acts:
            out.append(("class:bar", " │ Act: "))
            for n, (number, level) in enumerate(acts):
                if n:
                    out.append(("class:bar", ","))
                out.append((ACTIVITY_STYLE[level], str(number)))
        if unsent := self.controller.undelivered():
            out += [("class:bar", " │ "), ("class:bar.unsent", f"{unsent} unsent")]
        if self.more_below:
            out += [("class:bar", " "), ("class:bar.more", f"-- MORE ({self.more_below}) --")]
        hint = " /help  Alt-1..9  Alt-A "
        used = sum(cells(t) for _, t, *_ in out)
        _, width = self._size()
        if used + cells(hint) < width:
            out.append(("class:bar", " " * (width - used - cells(hint)) + hint))
        return out

    def _prompt(self) -> StyleAndTextTuples:
        question = self.controller.question
        if question is not None:
            return [("class:question", clean(question.text)), ("", " ")]
        where = self._label(self.model.active)
        lines = self.buffer.document.line_count
        extra = f" {lines} lines" if lines > 1 else ""
        return [("class:prompt", f"[{where}{extra}] ")]

    def _after_render(self, _: object) -> None:
        if not self.title:
            return
        acts = ",".join(str(n) for n, _ in self.activity_list())
        title = f"compose-chat: {clean(self.model.nick)} {self._label(self.model.active)}"
        if acts:
            title += f" [Act: {acts}]"
        if title != self._last_title:
            self._last_title = title
            self.app.output.set_title(title)
            self.app.output.flush()

    # --- input -----------------------------------------------------------------------------

    def _accept(self, buffer: Buffer) -> bool:
        text = buffer.text
        if not text.strip():
            return False
        if self.controller.submit(text):
            self.to_bottom()
            return False  # clears the line; history keeps it
        return True  # refused as it is: keep it for editing

    def _mention(self, entry: Entry) -> None:
        now = time.monotonic()
        if self.app.is_running and now - self._last_bell >= BELL_QUIET:
            self._last_bell = now
            self.app.output.bell()

    def _go(self, name: str | None) -> None:
        if name is not None:
            self.model.switch(name)

    def _bindings(self) -> KeyBindings:
        kb = KeyBindings()
        asking = Condition(lambda: self.controller.question is not None)
        empty = Condition(lambda: not self.buffer.text)

        @kb.add("c-c")
        def _quit(event: KeyPressEvent) -> None:
            self.controller.request_quit(self.buffer.text)

        @kb.add("c-d", filter=empty)
        def _eof(event: KeyPressEvent) -> None:
            self.controller.request_quit()

        @kb.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            self.buffer.insert_text("\n")

        @kb.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            # A paste keeps its lines (one message); its final newline is not a line.
            text = event.data.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
            self.buffer.insert_text(text)

        @kb.add("pageup")
        def _page_up(event: KeyPressEvent) -> None:
            self.scroll(-1)

        @kb.add("pagedown")
        def _page_down(event: KeyPressEvent) -> None:
            self.scroll(1)

        @kb.add("c-home")
        @kb.add("escape", "home")
        @kb.add("home", filter=empty)
        def _top(event: KeyPressEvent) -> None:
            self.scroll(float("-inf"))

        @kb.add("c-end")
        @kb.add("escape", "end")
        @kb.add("end", filter=empty)
        def _bottom(event: KeyPressEvent) -> None:
            self.to_bottom()

        for digit in "1234567890":
            number = int(digit) or 10

            @kb.add("escape", digit)
            def _window(event: KeyPressEvent, number: int = number) -> None:
                self._go(self.model.by_number(number))

        @kb.add("escape", "a")
        def _active(event: KeyPressEvent) -> None:
            self._go(self.model.next_active() or self.model.previous)

        @kb.add("c-n")
        @kb.add("escape", "right")
        @kb.add("escape", "down")
        def _next(event: KeyPressEvent) -> None:
            self.model.cycle(1)

        @kb.add("c-p")
        @kb.add("escape", "left")
        @kb.add("escape", "up")
        def _previous(event: KeyPressEvent) -> None:
            self.model.cycle(-1)

        @kb.add("c-l")
        def _redraw(event: KeyPressEvent) -> None:
            event.app.renderer.clear()

        @kb.add("tab")
        def _complete(event: KeyPressEvent) -> None:
            if self.buffer.complete_state:
                self.buffer.complete_next()
            else:
                self.buffer.start_completion(select_first=True)

        # Added last so that, while a question waits, they win over every key above
        # (of the bindings that match a key, prompt_toolkit calls the last one added).
        @kb.add(Keys.Any, filter=asking, eager=True)
        @kb.add("enter", filter=asking, eager=True)
        def _ignore(event: KeyPressEvent) -> None:
            pass  # a question waits for y or n

        @kb.add("n", filter=asking, eager=True)
        @kb.add("N", filter=asking, eager=True)
        @kb.add("c-c", filter=asking, eager=True)
        @kb.add("escape", filter=asking, eager=True)
        def _no(event: KeyPressEvent) -> None:
            self.controller.answer(False)

        @kb.add("y", filter=asking, eager=True)
        @kb.add("Y", filter=asking, eager=True)
        def _yes(event: KeyPressEvent) -> None:
            self.controller.answer(True)

        return kb
