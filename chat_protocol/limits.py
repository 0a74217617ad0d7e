"""Fixed limits of protocol version 1, the same for every server.

Limits that an operator may tune (rates, buffers, caps, byte budgets) are not here: the
server announces those in its ``welcome`` frame.
"""

PROTOCOL_VERSION = 1

#: The HTTP header of the WebSocket handshake's answer that carries the database's epoch
#: (the same string as ``welcome.epoch``), so a client knows which server it talks to
#: before it sends ``hello``: nick secrets belong to a database, not to a URL.
EPOCH_HEADER = "Chat-Epoch"

#: Largest frame a client may send, in bytes; a larger one is closed with 1009.
MAX_FRAME_BYTES = 64 * 1024
#: No frame the server sends is larger than this (history and replays are split to fit).
MAX_SERVER_FRAME_BYTES = 1024 * 1024
#: Longest message body, in Unicode code points.
MAX_BODY_CHARS = 4000
MAX_NICK_CHARS = 24
MAX_ROOM_CHARS = 32
MAX_CID_CHARS = 64
MAX_REF_CHARS = 64
#: A secret is 1-128 of ``A-Z a-z 0-9 _ -``; one the server generates is 32 of them.
MAX_SECRET_CHARS = 128
#: The shortest secret a client may propose when it registers a nick (about 128 bits).
MIN_PROPOSED_SECRET_CHARS = 22
#: Rooms one connection may be in at once.
MAX_ROOMS = 32
#: Messages in one ``history`` reply: the default and the most a client may ask for.
HISTORY_DEFAULT = 50
HISTORY_MAX = 200
#: Rooms in one ``rooms`` reply: the default and the most a client may ask for.
ROOMS_PAGE_DEFAULT = 100
ROOMS_PAGE_MAX = 500

#: Nicks in one ``joined`` or ``members`` frame; ``more`` says the list goes on.
MEMBERS_MAX = 1000

DEFAULT_ROOM = "lobby"

#: The Unicode White_Space property (PropList.txt): a body made only of these is empty.
WHITE_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
