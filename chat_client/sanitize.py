"""Make untrusted text safe for a terminal.

Nicks and bodies come from other people. Written raw, an escape sequence in them could
set the window title, write the clipboard (OSC 52), move the cursor or hide text. This
removes every control sequence (CSI, OSC, DCS/SOS/PM/APC strings, other ESC sequences, and
their 8-bit C1 forms) and every other control character, including BEL, CR, backspace and
DEL; bidirectional controls (overrides, isolates and the LRM/RLM/ALM marks) are removed
too, so text cannot reorder what follows it, and the line and paragraph separators
U+2028/U+2029 count as newlines.

It also removes what makes an emoji sequence's width ambiguous. Terminals disagree about
how many cells a skin-tone modifier, a ZWJ sequence, a variation selector or a flag takes
(one draws the sequence as one glyph, another as its parts), and prompt_toolkit counts
code point by code point; where the client, prompt_toolkit and the terminal disagree,
text is hidden or stale characters stay on the screen. So ZWJ between emoji, the
modifiers, variation selectors and tag characters are dropped (every emoji then shows as
itself, two cells everywhere), and a flag becomes its letters: 🇯🇵 is ``[JP]``.
"""

import re
import unicodedata

# ESC or the 8-bit introducers, followed by what each kind of sequence consumes.
_SEQUENCE = re.compile(
    r"""
    (?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?        # CSI
  | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])                   # OSC, DCS, SOS, PM, APC ...
        [^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?                 # ... up to BEL or ST
  | \x1b[\x20-\x2f]*[\x30-\x7e]?                              # any other ESC sequence
    """,
    re.VERBOSE,
)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Skin-tone modifiers, variation selectors, tag characters (subdivision flags).
_WIDTH_AMBIGUOUS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0e\ufe0f\U000e0000-\U000e007f]")
_ZWJ = re.compile("\u200d")
_FLAG = re.compile("[\U0001f1e6-\U0001f1ff]{1,2}")
_A = ord("A") - 0x1F1E6


def _flag(found: re.Match[str]) -> str:
    return "[" + "".join(chr(ord(c) + _A) for c in found.group()) + "]"


def _zwj(found: re.Match[str]) -> str:
    """Drop a ZWJ that joins symbols (emoji); keep one that shapes a script's letters."""
    text, at = found.string, found.start()
    around = text[at - 1 : at] + text[at + 1 : at + 2]
    return "" if any(unicodedata.category(c) in ("So", "Sk") for c in around) else "\u200d"


def unambiguous(text: str) -> str:
    """Text whose width every terminal and prompt_toolkit count alike (see above)."""
    text = _WIDTH_AMBIGUOUS.sub("", text)
    text = _ZWJ.sub(_zwj, text)
    return _FLAG.sub(_flag, text)


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """Text with no escape sequences and no control characters.

    Tabs become a space. Newlines stay only with ``keep_newlines``; otherwise they
    become the visible symbol ``⏎`` so a one-line view cannot be split.
    """
    text = _SEQUENCE.sub("", text)
    text = text.replace("\t", " ").replace("\u2028", "\n").replace("\u2029", "\n")
    if not keep_newlines:
        text = text.replace("\r\n", " ⏎ ").replace("\n", " ⏎ ")
    return unambiguous(_CONTROLS.sub("", text))
