"""The filter plugins (fault, ratelimit, tap, lua, wasm) and example filter programs."""
