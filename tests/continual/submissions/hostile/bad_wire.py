"""Answers the harness with a malformed message, chosen by ``context.hparams["attack"]``:

* ``recursion``: a reply header nested 50,000 levels deep (a decoder that recurses crashes);
* ``huge_frame``: a frame whose length prefix announces 2**62 bytes;
* ``overflow``: a predictions reply whose array shape is (2**70,), beyond 64-bit integers;
* ``wraparound``: a predictions reply of shape (2**32, 2**32, 4), whose byte count wraps
  to 0 in 64-bit arithmetic;
* ``ack_ahead``: acknowledges the next ``hparams["ahead"]`` training experiences before
  receiving them (and swallows its runner's real acknowledgements), so that a harness that
  takes any ``trained`` message pushes the stream early; ``train`` then reports how many
  experiences were already waiting, unread, when it was called (a read-ahead of the stream).

It writes raw bytes to the runner's socket, in the framing of the harness it finds."""

import json
import struct
import sys

import torch

from continual.harness import wire

ATTACK = {}
STRATEGY = {}
#: array shapes of the impossible predictions replies
SHAPES = {"overflow": json.dumps([2**70]), "wraparound": json.dumps([2**32, 2**32, 4])}


def _frame(payload: bytes) -> bytes:
    if hasattr(wire, "SubmissionChannel"):  # length-prefixed frames of this harness
        return struct.pack(">Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload  # multiprocessing.connection framing


def _send_raw(data: bytes) -> None:
    import os

    fd = int(sys.argv[1])
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _current_request() -> dict:
    import gc

    for obj in gc.get_objects():
        if type(obj).__name__ == "SubmissionChannel" and getattr(obj, "current", None):
            return obj.current
    return {}


class Idle:
    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.waiting = 0

    def train(self, experience):
        import select

        if select.select([int(sys.argv[1])], [], [], 0.2)[0]:  # the next message is already here
            self.waiting += 1


def make_strategy(context):
    attack = ATTACK["name"] = context.hparams["attack"]
    request = _current_request()
    echo = {"seq": request.get("seq"), "nonce": request.get("nonce")}
    if attack == "recursion":
        _send_raw(_frame(b"[" * 50_000 + b"]" * 50_000))
    elif attack == "huge_frame":
        header = struct.pack(">Q", 2**62) if hasattr(wire, "SubmissionChannel") else struct.pack("!i", -1) + struct.pack("!Q", 2**62)
        _send_raw(header)
    elif attack == "ack_ahead":
        ahead = int(context.hparams.get("ahead", 5))
        for step in range(1, ahead + 1):
            guess = {"type": "trained", "arrays": [], "seq": (echo["seq"] or 0) + step, "nonce": echo["nonce"]}
            _send_raw(_frame(json.dumps(guess).encode()))
        real_send, swallowed = wire.send, []

        def send(*args, **kwargs):
            if args[1].get("type") == "trained" and len(swallowed) < ahead:
                swallowed.append(1)
                return None
            return real_send(*args, **kwargs)

        wire.send = send
    return STRATEGY.setdefault("idle", Idle(context.num_classes))



def predict(strategy, images):
    attack = ATTACK.get("name")
    if attack in SHAPES:  # answer the prediction request with an impossible array
        echo = _current_request()
        described = ('["scores", "float32", ' + SHAPES[attack] + "]" if hasattr(wire, "SubmissionChannel")
                     else '{"name": "scores", "dtype": "float32", "shape": ' + SHAPES[attack] + "}")  # older format
        _send_raw(_frame(('{"type": "predictions", "index": 0, "arrays": [' + described + '], '
                          f'"seq": {json.dumps(echo.get("seq"))}, "nonce": {json.dumps(echo.get("nonce"))}' + "}").encode()))
        _send_raw(_frame(b"\0" * 16))
        import time

        time.sleep(30)  # the harness must decide without this process's help
    print("REPORT " + json.dumps({"experiences waiting unread when train was called": strategy.waiting}), flush=True)
    return torch.zeros(images.shape[0], strategy.num_classes)

