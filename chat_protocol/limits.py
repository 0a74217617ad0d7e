"""Fixed limits of protocol version 1, the same for every server.

Limits that an operator may tune (rates, buffers, caps) are not here: the server
announces those in its ``welcome`` frame.
"""

PROTOCOL_VERSION = 1

#: Largest frame a client may send, in bytes; a larger one is closed with 1009.
MAX_FRAME_BYTES = 64 * 1024
#: Longest message body, in Unicode code points.
MAX_BODY_CHARS = 4000
MAX_NICK_CHARS = 24
MAX_ROOM_CHARS = 32
MAX_CID_CHARS = 64
MAX_REF_CHARS = 64
MAX_SECRET_CHARS = 128
#: Rooms one connection may be in at once.
MAX_ROOMS = 32
#: Messages in one ``history`` reply: the default and the most a client may ask for.
HISTORY_DEFAULT = 50
HISTORY_MAX = 200

DEFAULT_ROOM = "lobby"
