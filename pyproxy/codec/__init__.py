"""Sans-I/O protocol codecs: bytes in, events out; events in, bytes out.

Nothing is imported here: a module that needs one codec (the stats reading gRPC's
status names, say) does not load the others with it.
"""
