"""The I/O layer: the only code that makes syscalls on the data path, and times them."""
