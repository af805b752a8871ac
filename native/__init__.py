"""Native I/O module (cffi): splice relay, MSG_ZEROCOPY sends; optional, with pure-Python fallback."""
