"""Sans-I/O protocol codecs: bytes in, events out; events in, bytes out."""
