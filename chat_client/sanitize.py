"""Make untrusted text safe for a terminal.

Nicks and bodies come from other people. Written raw, an escape sequence in them could
set the window title, write the clipboard (OSC 52), move the cursor or hide text. This
removes every control sequence (CSI, OSC, DCS/SOS/PM/APC strings, other ESC sequences, and
their 8-bit C1 forms) and every other control character, including BEL, CR, backspace and
DEL; bidirectional overrides are removed too, so text cannot reorder what follows it.
"""

import re

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
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """Text with no escape sequences and no control characters.

    Tabs become a space. Newlines stay only with ``keep_newlines``; otherwise they
    become the visible symbol ``⏎`` so a one-line view cannot be split.
    """
    text = _SEQUENCE.sub("", text)
    text = text.replace("\t", " ")
    if not keep_newlines:
        text = text.replace("\r\n", " ⏎ ").replace("\n", " ⏎ ")
    return _CONTROLS.sub("", text)
