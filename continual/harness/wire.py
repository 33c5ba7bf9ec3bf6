"""The wire protocol between the harness and the submission process.

Nothing is pickled in either direction (unpickling runs code), and nothing a submission sends
can make the harness allocate, recurse or compute more than the harness expects:

* **frames**: an 8-byte big-endian length, then that many bytes. A frame longer than the
  receiver's limit for that position is refused before any byte of it is read;
* **messages**: one header frame (a flat JSON object of at most :data:`MAX_HEADER_BYTES`),
  then one raw frame per array it describes (``[name, dtype, shape]``);
* **strict request-reply**: every harness message is a request with a sequence number and a
  random nonce, answered by exactly one reply that must echo both. A reply cannot be sent
  before its request was read (it would not know the nonce), so a submission cannot
  acknowledge ahead and have the stream pushed to it early;
* **replies are checked against a schema** (:data:`REPLIES`): the allowed keys of each reply
  type and their types (strings of bounded length, integers, booleans; no nesting), and the
  exact arrays the harness expects (name, dtype and shape fixed by the harness, so the payload
  size is known before it is read). Anything else is a :class:`ProtocolError`: the decoder
  converts every failure (invalid UTF-8 or JSON, recursion, overflow, wrong types) into it.

The submission side decodes the harness's requests with the same framing; being the
harness's own messages, they may carry nested JSON (the setup context).
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

#: dtypes allowed on the wire
ALLOWED_DTYPES = ("uint8", "int64", "float32")
#: the largest header either side accepts
MAX_HEADER_BYTES = 64 * 1024
#: the largest array the submission side accepts from the harness (the test images)
MAX_REQUEST_ARRAY_BYTES = 8 * 1024**3
_LENGTH = struct.Struct(">Q")
#: longest string value in a reply
MAX_STRING = 16 * 1024
#: the keys every message carries besides its own
_ENVELOPE = ("type", "seq", "nonce", "arrays")


class ProtocolError(RuntimeError):
    """A malformed, unexpected or out-of-order message."""


@dataclass(frozen=True)
class ArraySpec:
    """An array the receiver expects: its name, dtype and exact shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * np.dtype(self.dtype).itemsize


#: reply type -> {key: type} of the keys it may carry (besides the envelope)
REPLIES: dict[str, dict[str, type]] = {
    "ready": {},
    "loaded": {},
    "trained": {},
    "predictions": {"index": int},
    "done": {},
    "error": {"kind": str, "message": str, "traceback": str},
}


class WrongArray(ProtocolError):
    """A well-formed reply whose array is not the one expected (e.g. scores of another shape)."""


# -- framing ----------------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise EOFError("the other side closed the connection")
        received += count
    return buffer


def _recv_frame(sock: socket.socket, limit: int) -> bytearray:
    (length,) = _LENGTH.unpack(bytes(_recv_exact(sock, _LENGTH.size)))
    if length > limit:
        raise ProtocolError(f"a frame of {length} bytes exceeds the {limit}-byte limit")
    return _recv_exact(sock, length)


def _send_frame(sock: socket.socket, payload: bytes | memoryview) -> None:
    sock.sendall(_LENGTH.pack(len(payload)))
    if len(payload):
        sock.sendall(payload)


def send(sock: socket.socket, header: dict[str, Any], **arrays: np.ndarray) -> None:
    """Send ``header`` (JSON) and then the raw bytes of ``arrays``, in keyword order."""
    described, payloads = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {array.dtype}, allowed: {ALLOWED_DTYPES}")
        described.append([name, array.dtype.name, list(array.shape)])
        payloads.append(memoryview(array).cast("B"))
    _send_frame(sock, json.dumps({**header, "arrays": described}).encode())
    for payload in payloads:
        _send_frame(sock, payload)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _decode_header(raw: bytearray) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, OverflowError, TypeError) as error:
        raise ProtocolError(f"unreadable message header ({type(error).__name__})") from error
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("a message header must be a JSON object with a string 'type'")
    return header


def _array_descriptions(header: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    described = header.get("arrays", [])
    if not isinstance(described, list) or len(described) > 4:
        raise ProtocolError("'arrays' must be a list of at most 4 descriptions")
    out = []
    for spec in described:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], str)
                and isinstance(spec[2], list) and len(spec[2]) <= 4
                and all(type(d) is int and 0 <= d < 2**40 for d in spec[2])):
            raise ProtocolError("an array description must be [name, dtype, shape] with at most 4 small dimensions")
        if spec[1] not in ALLOWED_DTYPES:
            raise ProtocolError(f"array dtype {spec[1][:20]!r} is not allowed")
        out.append((spec[0][:64], spec[1], tuple(spec[2])))
    return out


# -- the harness's side ---------------------------------------------------------------------------
class HarnessChannel:
    """Requests from the harness, each answered by one checked reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    def request(
        self, header: dict[str, Any], reply: str, expect: tuple[ArraySpec, ...] = (), **arrays: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send a request and return its reply (``reply`` type, or ``error``).

        Raises:
            ProtocolError: anything but the expected reply to this very request.
            WrongArray: the reply is well formed but its array is not ``expect``.
            EOFError, OSError: the connection broke.
        """
        self.seq += 1
        nonce = secrets.token_hex(16)
        send(self.sock, {**header, "seq": self.seq, "nonce": nonce}, **arrays)
        received = _decode_header(_recv_frame(self.sock, MAX_HEADER_BYTES))
        kind = received["type"]
        if kind not in (reply, "error"):
            raise ProtocolError(f"expected a {reply!r} reply, got {kind[:40]!r}")
        if received.get("seq") != self.seq or received.get("nonce") != nonce:
            raise ProtocolError(f"the {kind!r} reply does not answer request {self.seq} (sent before it was read?)")
        schema = REPLIES[kind]
        for key, value in received.items():
            if key in ("type", "seq", "nonce", "arrays"):
                continue
            if key not in schema:
                raise ProtocolError(f"key {key[:40]!r} is not allowed in a {kind!r} reply")
            if type(value) is not schema[key] or (isinstance(value, str) and len(value) > MAX_STRING):
                raise ProtocolError(f"key {key!r} of a {kind!r} reply must be a {schema[key].__name__}")
            if isinstance(value, int) and not -(2**53) < value < 2**53:
                raise ProtocolError(f"key {key!r} is out of range")
        described = _array_descriptions(received)
        expected = expect if kind != "error" else ()
        if [(n, d, s) for n, d, s in described] != [(e.name, e.dtype, e.shape) for e in expected]:
            got = ", ".join(f"{n} {d} {s}" for n, d, s in described) or "none"
            want = ", ".join(f"{e.name} {e.dtype} {e.shape}" for e in expected) or "none"
            raise WrongArray(f"the {kind!r} reply carries arrays {got}, expected {want}")
        out = {}
        for spec in expected:
            payload = _recv_frame(self.sock, spec.nbytes)
            if len(payload) != spec.nbytes:
                raise ProtocolError(f"array {spec.name!r}: {len(payload)} bytes, expected {spec.nbytes}")
            out[spec.name] = np.frombuffer(payload, dtype=spec.dtype).reshape(spec.shape)
        return received, out


# -- the submission's side ------------------------------------------------------------------------
class SubmissionChannel:
    """Requests as the submission process reads them, and its replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.current: dict[str, Any] | None = None

    def receive(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The next request and its arrays."""
        header = _decode_header(_recv_frame(self.sock, MAX_HEADER_BYTES))
        arrays = {}
        for name, dtype, shape in _array_descriptions(header):
            size = ArraySpec(name, dtype, shape).nbytes
            payload = _recv_frame(self.sock, min(size, MAX_REQUEST_ARRAY_BYTES))
            if len(payload) != size:
                raise ProtocolError(f"array {name!r}: {len(payload)} bytes, expected {size}")
            arrays[name] = np.frombuffer(payload, dtype=dtype).reshape(shape)
        self.current = header
        return header, arrays

    def reply(self, header: dict[str, Any], **arrays: np.ndarray) -> None:
        """Answer the request read last (echoing its sequence number and nonce)."""
        if self.current is None:
            raise ProtocolError("no request to answer")
        echo = {"seq": self.current.get("seq"), "nonce": self.current.get("nonce")}
        send(self.sock, {**header, **echo}, **arrays)
