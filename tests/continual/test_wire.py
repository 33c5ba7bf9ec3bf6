"""The wire decoder against malformed and out-of-order messages, in-process (the hostile
submissions send the same bytes end to end, test_hostile_submissions.py)."""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np
import pytest

from continual.harness import wire


def _exchange(reply_frames: list[bytes], expect=(), reply="trained"):
    """The harness sends one request; the peer answers with raw ``reply_frames`` (built by
    a function of the request's header)."""
    harness, peer = socket.socketpair()
    channel = wire.HarnessChannel(harness)

    def answer() -> None:
        request = wire.SubmissionChannel(peer).receive()[0]
        for frame in reply_frames(request) if callable(reply_frames) else reply_frames:
            peer.sendall(frame)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        return channel.request({"type": "train"}, reply, expect=expect)
    finally:
        thread.join(5)
        harness.close()
        peer.close()


def _frame(payload: bytes) -> bytes:
    return struct.pack(">Q", len(payload)) + payload


def _header(request: dict, **fields) -> bytes:
    return _frame(json.dumps({"seq": request["seq"], "nonce": request["nonce"], "arrays": [], **fields}).encode())


def test_a_well_formed_reply_is_accepted() -> None:
    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    expect = (wire.ArraySpec("scores", "float32", (2, 3)),)

    def frames(request):
        header = {"type": "predictions", "index": 0, "seq": request["seq"], "nonce": request["nonce"],
                  "arrays": [["scores", "float32", [2, 3]]]}
        return [_frame(json.dumps(header).encode()), _frame(scores.tobytes())]

    header, arrays = _exchange(frames, expect=expect, reply="predictions")
    assert header["index"] == 0 and np.array_equal(arrays["scores"], scores)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda r: [_frame(b"[" * 60_000 + b"]" * 60_000)], id="recursion"),
        pytest.param(lambda r: [struct.pack(">Q", 2**62)], id="huge-frame"),
        pytest.param(lambda r: [_frame(b"\xff\xfe not utf-8")], id="not-utf8"),
        pytest.param(lambda r: [_frame(b'{"type": "trained", "x": NaN}')], id="nan"),
        pytest.param(lambda r: [_frame(b"[1, 2]")], id="not-an-object"),
        pytest.param(lambda r: [_header(r, type="predictions")], id="wrong-type"),
        pytest.param(lambda r: [_header({**r, "nonce": "0" * 32}, type="trained")], id="wrong-nonce"),
        pytest.param(lambda r: [_header({**r, "seq": r["seq"] + 1}, type="trained")], id="wrong-seq"),
        pytest.param(lambda r: [_header(r, type="trained", extra={"nested": [1, [2]]})], id="unknown-key"),
        pytest.param(lambda r: [_header(r, type="error", kind=["x"], message="m", traceback="t")], id="wrong-value-type"),
        pytest.param(lambda r: [_header(r, type="error", kind="crash", message="m" * 20_000, traceback="")], id="long-string"),
        pytest.param(lambda r: [_header(r, type="trained", arrays=[["a", "float32", [2**70]]])], id="overflow"),
        pytest.param(lambda r: [_header(r, type="trained", arrays=[["a", "float32", [1e400]]])], id="float-dim"),
        pytest.param(lambda r: [_header(r, type="trained", arrays=[["a", "object", [1]]])], id="bad-dtype"),
        pytest.param(lambda r: [_header(r, type="trained", arrays=[["a", "uint8", [-1]]])], id="negative-dim"),
        pytest.param(lambda r: [_header(r, type="trained", arrays=[["a", "uint8", [2**32, 2**32, 4]]])], id="wraparound"),
        pytest.param(lambda r: [_header(r, type="trained", arrays={"a": 1})], id="arrays-not-a-list"),
    ],
)
def test_malformed_replies_raise_protocol_errors_only(frames) -> None:
    with pytest.raises(wire.ProtocolError):
        _exchange(frames)


def test_a_reply_sent_before_its_request_is_refused() -> None:
    harness, peer = socket.socketpair()
    # acknowledgements pushed ahead: they cannot carry the nonce of requests not sent yet
    for seq in (1, 2, 3):
        peer.sendall(_frame(json.dumps({"type": "trained", "seq": seq, "nonce": "guess", "arrays": []}).encode()))
    with pytest.raises(wire.ProtocolError, match="does not answer"):
        wire.HarnessChannel(harness).request({"type": "train"}, "trained")
    harness.close()
    peer.close()


def test_a_payload_longer_than_its_description_is_refused() -> None:
    expect = (wire.ArraySpec("scores", "float32", (2, 3)),)

    def frames(request):
        header = {"type": "predictions", "index": 0, "seq": request["seq"], "nonce": request["nonce"],
                  "arrays": [["scores", "float32", [2, 3]]]}
        return [_frame(json.dumps(header).encode()), _frame(b"\0" * (24 + 4))]

    with pytest.raises(wire.ProtocolError, match="exceeds"):
        _exchange(frames, expect=expect, reply="predictions")
