"""Proxy-Wasm's byte encodings: header pairs (the spec's "Serialization"), and attribute values as
Envoy's host serializes them (`serializeValue` in its wasm context).

Envoy's rules, by the value's type: a string or bytes as they are; an integer as 8 bytes
little-endian (signed or unsigned alike); a double as 8 bytes; a bool as one byte; a duration
or a timestamp as int64 nanoseconds; a protobuf message (node, metadata, route_metadata) as its
binary protobuf encoding; a map as pairs, each value serialized by these rules (a
google.protobuf.Struct selected from inside a message is such a map); a list as pairs whose keys
are the items and whose values are empty.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any


def serialize_pairs(pairs) -> bytes:
    """count, then (key length, value length) per pair, then each key and value followed by NUL."""
    pairs = list(pairs)
    out = [struct.pack("<I", len(pairs))]
    out.extend(struct.pack("<II", len(k), len(v)) for k, v in pairs)
    for k, v in pairs:
        out.append(k + b"\0" + v + b"\0")
    return b"".join(out)


def deserialize_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    if len(data) <= 1:  # an empty map may be empty or a single NUL
        return []
    (count,) = struct.unpack_from("<I", data)
    if count > (len(data) - 4) // 8:
        raise ValueError("pair count larger than the data")
    sizes = struct.unpack_from(f"<{2 * count}I", data, 4)
    pos = 4 + 8 * count
    pairs = []
    for i in range(count):
        klen, vlen = sizes[2 * i], sizes[2 * i + 1]
        if pos + klen + vlen + 2 > len(data):
            raise ValueError("pair sizes overrun the data")
        key = data[pos : pos + klen]
        pos += klen + 1
        value = data[pos : pos + vlen]
        pos += vlen + 1
        pairs.append((key, value))
    return pairs


@dataclass(frozen=True)
class Uint64:
    """An attribute Envoy types as uint64 (connection.id, response.flags)."""

    value: int


@dataclass(frozen=True)
class Message:
    """A protobuf message attribute: its fields can be selected by name (a path goes on into
    them), and whole it is sent as its binary encoding."""

    fields: dict[str, Any]
    encoded: bytes


def int64(value: int) -> bytes:
    """Envoy's encoding of an integer attribute: 8 bytes, little-endian."""
    return struct.pack("<q", value)


def serialize(value: Any) -> bytes:
    """An attribute value in Envoy's encoding (see the module's docstring)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return int64(value)
    if isinstance(value, Uint64):
        return struct.pack("<Q", value.value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, Message):
        return value.encoded
    if isinstance(value, dict):
        return serialize_pairs((_text(k), serialize(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return serialize_pairs((serialize(item), b"") for item in value)
    if value is None:
        return b""
    raise TypeError(f"no encoding for {type(value).__name__}")


def select(value: Any, part: bytes) -> Any:
    """One step of a property path: a map's key, a message's field, a list's index; None if absent."""
    if isinstance(value, Message):
        return value.fields.get(part.decode(errors="replace"))
    if isinstance(value, dict):
        found = value.get(part.decode(errors="replace"))
        return found if found is not None else value.get(part)
    if isinstance(value, list | tuple):
        try:
            index = int(part)
        except ValueError:
            return None
        return value[index] if 0 <= index < len(value) else None
    return None


# ---- protobuf (the messages Envoy hands over: Node, Metadata, google.protobuf.Struct) ----------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _text(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def struct_pb(fields: dict) -> bytes:
    """google.protobuf.Struct: map<string, Value> fields = 1."""
    return b"".join(
        _field(1, _field(1, _text(key)) + _field(2, value_pb(value)))
        for key, value in fields.items()
    )


def value_pb(value: Any) -> bytes:
    """google.protobuf.Value: null 1, number 2 (double), string 3, bool 4, struct 5, list 6."""
    if value is None:
        return _varint(1 << 3) + b"\x00"
    if isinstance(value, bool):
        return _varint(4 << 3) + (b"\x01" if value else b"\x00")
    if isinstance(value, int | float):
        return _varint(2 << 3 | 1) + struct.pack("<d", float(value))
    if isinstance(value, dict):
        return _field(5, struct_pb(value))
    if isinstance(value, list | tuple):
        return _field(6, b"".join(_field(1, value_pb(item)) for item in value))
    return _field(3, _text(value))


def metadata_message(filter_metadata: dict) -> Message:
    """envoy.config.core.v3.Metadata: map<string, Struct> filter_metadata = 1."""
    namespaces = {
        _text(ns).decode(errors="replace"): _plain(v) for ns, v in filter_metadata.items()
    }
    encoded = b"".join(
        _field(1, _field(1, ns.encode()) + _field(2, struct_pb(entry)))
        for ns, entry in namespaces.items()
    )
    return Message({"filter_metadata": namespaces}, encoded)


def node_message(node_id: str, cluster: str, metadata: dict) -> Message:
    """envoy.config.core.v3.Node: id 1, cluster 2, metadata 3 (Struct); proto3 leaves empty
    strings out."""
    encoded = b"".join(
        (
            _field(1, node_id.encode()) if node_id else b"",
            _field(2, cluster.encode()) if cluster else b"",
            _field(3, struct_pb(metadata)) if metadata else b"",
        )
    )
    return Message({"id": node_id, "cluster": cluster, "metadata": _plain(metadata)}, encoded)


def _plain(value: Any) -> Any:
    """Metadata as a Struct holds it: text keys, byte strings decoded (Lua sets bytes)."""
    if isinstance(value, dict):
        return {_text(k).decode(errors="replace"): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # a Struct's numbers are doubles
    return value
