"""Messages between the harness and the submission process: JSON headers and raw arrays.

Nothing is pickled in either direction: the harness must never unpickle bytes that a
submission produced (unpickling runs code). A message is one JSON frame, optionally followed
by one raw-bytes frame per array named in its ``arrays`` field (dtype and shape in the
header), over a ``multiprocessing.connection.Connection`` (length-prefixed frames).
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

#: dtypes allowed on the wire; anything else is rejected before any buffer is interpreted.
ALLOWED_DTYPES = ("uint8", "int64", "float32")
#: the largest frame the harness accepts from a submission (predictions of 1M x 1000 fp32).
MAX_FRAME_BYTES = 4 * 1024**3


class ProtocolError(RuntimeError):
    """A malformed message (wrong framing, dtype, shape or size)."""


def send(conn: Connection, header: dict[str, Any], **arrays: np.ndarray) -> None:
    """Send ``header`` (JSON) followed by the raw bytes of ``arrays`` in keyword order."""
    described = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {array.dtype}, allowed: {ALLOWED_DTYPES}")
        described.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        arrays[name] = array
    conn.send_bytes(json.dumps({**header, "arrays": described}).encode())
    for array in arrays.values():
        conn.send_bytes(memoryview(array).cast("B"))


#: the largest JSON header accepted.
MAX_HEADER_BYTES = 1024**2


def receive(conn: Connection, max_bytes: int = MAX_FRAME_BYTES) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Receive one message: its header and its arrays, validated against the header.

    ``max_bytes`` bounds every array payload (headers are bounded by ``MAX_HEADER_BYTES``), so
    a peer cannot make the receiver allocate more than it expects.

    Raises:
        ProtocolError: invalid JSON, an unknown dtype, or a payload whose size does not match
            the declared shape.
        EOFError: the other side closed the connection.
    """
    try:
        header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as error:
        raise ProtocolError(f"unreadable message header: {error}") from error
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("a message header must be a JSON object with a string 'type'")
    described = header.get("arrays", [])
    if not isinstance(described, list):
        raise ProtocolError("'arrays' must be a list")
    arrays: dict[str, np.ndarray] = {}
    for spec in described:
        try:
            name, dtype, shape = str(spec["name"]), str(spec["dtype"]), tuple(int(d) for d in spec["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"bad array description {spec!r}") from error
        if dtype not in ALLOWED_DTYPES or any(d < 0 for d in shape):
            raise ProtocolError(f"array {name!r}: dtype {dtype!r} or shape {shape} not allowed")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if expected > max_bytes:
            raise ProtocolError(f"array {name!r} of shape {shape} ({expected} bytes) exceeds the {max_bytes}-byte limit")
        try:
            payload = conn.recv_bytes(max(expected, 1))
        except OSError as error:  # longer than declared
            raise ProtocolError(f"array {name!r}: payload does not match its description") from error
        if len(payload) != expected:
            raise ProtocolError(f"array {name!r}: {len(payload)} bytes, expected {expected}")
        arrays[name] = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return header, arrays
