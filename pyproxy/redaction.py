"""What /config_dump may show: the one rule for hiding secrets and inline code in a config view.

The structure stays (every field is still there, so an operator sees what is configured);
the values that must not leave the process are replaced:

- secret-like fields: a key whose last word (split on `_`, `-`, `.`) is one of SECRET_WORDS,
  e.g. `password`, `api_key`, `client_secret`, `auth_token` (but not `token_bucket`,
  `max_tokens` or a bare `key`): every value under it becomes "[redacted]", nothing of it is shown.
- a match on a secret-like header, e.g. {name: authorization, exact: "Bearer ..."}: the
  values it compares with (MATCH_FIELDS) are redacted the same way.
- inline code and plugin configuration (CODE_FIELDS): Lua source, WebAssembly text, a Wasm
  plugin's configuration strings. They become "[redacted: N chars, sha256:<12 hex>]", enough
  to tell which version is loaded without showing it.
"""

from __future__ import annotations

import hashlib
import re

SECRET_WORDS = frozenset(
    {
        "secret",
        "password",
        "passwd",
        "passphrase",
        "token",
        "apikey",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "signature",
    }
)
# Words that say secret only with a qualifier: `api_key`, `private-key`, but not a bare `key`
# (the rate limit's descriptor key names a header; hiding it would hide the configuration).
QUALIFIED_SECRET_WORDS = frozenset({"key"})
CODE_FIELDS = frozenset(
    {"inline_code", "code", "code_wat", "inline_string", "configuration", "vm_configuration"}
)
MATCH_FIELDS = frozenset({"exact", "prefix", "suffix", "contains", "regex", "value"})
SECRET_MARK = "[redacted]"
_WORDS = re.compile(r"[_.\-]+")


def is_secret_name(name: str) -> bool:
    """`x-api-key`, `client_secret`, `Authorization`: the last word of the name says secret."""
    words = [w for w in _WORDS.split(name.lower()) if w]
    if not words:
        return False
    return words[-1] in SECRET_WORDS or (len(words) > 1 and words[-1] in QUALIFIED_SECRET_WORDS)


def code_mark(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return f"[redacted: {len(data)} chars, sha256:{hashlib.sha256(data).hexdigest()[:12]}]"


def redact(value: object) -> object:
    """A copy of a plain JSON-like value (dicts, lists, scalars) with the rule above applied."""
    if isinstance(value, dict):
        named = value.get("name")
        names_secret = isinstance(named, str) and is_secret_name(named)
        out = {}
        for key, item in value.items():
            name = str(key)
            if is_secret_name(name) or (names_secret and name in MATCH_FIELDS):
                out[key] = _hide(item)
            elif name in CODE_FIELDS and isinstance(item, str | bytes) and item:
                out[key] = code_mark(item)
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _hide(value: object) -> object:
    """Every scalar under a secret becomes the mark; mappings and lists keep their shape."""
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hide(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    return SECRET_MARK
