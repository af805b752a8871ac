"""HTTP protocol facts every path obeys, defined once.

The codecs, the general path and the counters import them from here, and the
native build writes them into native/protocol_facts.h (native/facts_header.py)
for the C pair and the C codecs: a fact changed here changes in both languages.
This module imports nothing from pyproxy, so the build can load it from the
source tree.
"""

from __future__ import annotations

from typing import Final

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, plus
# Proxy-Connection (never standard, still sent by old clients) and Keep-Alive
# (RFC 2068 §19.7.1). Fields a Connection option names are dropped too.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)

# RFC 9113 §8.2.2: connection-specific fields never appear in HTTP/2 (a message carrying one is
# malformed); TE is the exception when its value is exactly "trailers".
H2_CONNECTION_SPECIFIC: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)
H2_TE_ALLOWED: Final = b"trailers"

# RFC 3986 characters an HTTP/2 request's :path and :authority may hold to cross into an
# HTTP/1 request line and Host field (a path also takes "%"-escapes; no whitespace, controls or
# non-ASCII: they would split or bend the line). RFC 9113 §8.3.1: no userinfo ("@") in
# :authority: host, optional port, IPv6 literals in brackets.
URI_UNRESERVED_SUB: Final = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%"
)
PATH_CHARS: Final = URI_UNRESERVED_SUB + b":@/?#[]"
AUTHORITY_CHARS: Final = URI_UNRESERVED_SUB + b":[]"

# RFC 9110 §6.4.1, §15.3.5, §15.4.5: responses that never carry content, whatever their
# framing fields say: informational ones (below FIRST_FINAL_STATUS), these statuses, and
# every response to a HEAD request.
FIRST_FINAL_STATUS: Final = 200
NO_BODY_STATUSES: Final = frozenset({204, 304})
NO_BODY_METHOD: Final = b"HEAD"
# RFC 9110 §8.6, RFC 9112 §6.1: nor may these (or a 1xx) carry Content-Length or
# Transfer-Encoding; a 304's Content-Length may still describe what a GET would get.
NO_FRAMING_STATUSES: Final = frozenset({204})
FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding"})

# Responses are counted by class, 1xx to 5xx; a status beyond 5xx (RFC 9110 §15 leaves
# 6xx-9xx unassigned, a peer may still send one) counts as 5xx: an unknown class is a server's.
STATUS_CLASSES: Final = 5


def status_has_body(status: int) -> bool:
    """Whether a response with ``status`` carries content (to any request but HEAD)."""
    return status >= FIRST_FINAL_STATUS and status not in NO_BODY_STATUSES


def framing_allowed(status: int) -> bool:
    """Whether a response with ``status`` may carry Content-Length or Transfer-Encoding."""
    return status >= FIRST_FINAL_STATUS and status not in NO_FRAMING_STATUSES


def has_body(status: int, method: bytes) -> bool:
    """Whether a response with ``status`` to a ``method`` request carries content."""
    return method != NO_BODY_METHOD and status_has_body(status)


def status_class(status: int) -> int:
    """The status's class, 1 (1xx) to STATUS_CLASSES; beyond it clamps to the last."""
    return min(status // 100, STATUS_CLASSES)
