"""Counter-based per-sample random numbers for the corruptions.

The official CIFAR-10-C generator (Hendrycks & Dietterich, ICLR 2019; spec
docs/METHODS.md §9.1) draws from NumPy's global RNG image by image, so a corrupted image
depends on everything generated before it. Here every random number is a pure function of
``(seed, corruption, severity, sample_id, stream, element index)``: a 32-bit integer hash of
those values. Corrupting images ``[0:64]`` and ``[64:128]`` separately therefore gives the
same result as corrupting ``[0:128]`` at once, on any device, without a Python loop over
samples.

The hash is Chris Wellons' "lowbias32" finaliser (xorshift-multiply, public domain), applied
twice per element with two independent per-sample keys. All arithmetic is on ``int64``
tensors holding values in ``[0, 2**32)``; both multipliers are given as signed
representatives of magnitude below ``2**31`` so that no product overflows ``int64`` (the low
32 bits, which are all that is kept, are those of the unsigned product).
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
# lowbias32 multipliers 0x7FEB352D and 0x846CA68B; the second as 0x846CA68B - 2**32.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9  # odd constant separating the two key chains


def hash32_int(value: int) -> int:
    """lowbias32 of a Python int (taken modulo 2**32); the scalar twin of :func:`hash32`."""
    x = value & _MASK
    x ^= x >> 16
    x = (x * _MUL1) & _MASK
    x ^= x >> 15
    x = (x * _MUL2) & _MASK
    x ^= x >> 16
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of an ``int64`` tensor with values in ``[0, 2**32)`` (returns a new tensor)."""
    x = x ^ (x >> 16)
    x.mul_(_MUL1).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL2).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 16)
    return x


def _hash32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on ``int32`` tensors holding 32-bit patterns (wrapping multiplication).

    About twice as fast as :func:`hash32`. Right shifts are made logical by masking; the
    multiplications rely on two's-complement wrap-around of ``int32`` products, which
    :func:`_wrapping_ok` verifies once per device type before this path is used.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x.mul_(_MUL1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_MUL2)
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    return x


def _to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """``int64`` values in ``[0, 2**32)`` -> ``int32`` with the same bit pattern."""
    return torch.where(x >= (1 << 31), x - (1 << 32), x).to(torch.int32)


_WRAPPING_OK: dict[str, bool] = {}


def _wrapping_ok(device: torch.device) -> bool:
    """Whether ``int32`` multiplication wraps on this device type (checked once, exactly)."""
    if device.type not in _WRAPPING_OK:
        values = [(i * 0x9E3779B9 + 12345) & _MASK for i in range(1031)]
        x = torch.tensor(values, dtype=torch.int64, device=device)
        try:
            got = _hash32_wrapping(_to_int32_bits(x)).to(torch.int64) & _MASK
            expected = torch.tensor([hash32_int(v) for v in values], dtype=torch.int64, device=device)
            _WRAPPING_OK[device.type] = bool(torch.equal(got, expected))
        except RuntimeError:  # int32 ops missing on an exotic backend
            _WRAPPING_OK[device.type] = False
    return _WRAPPING_OK[device.type]


class SampleRandom:
    """Random numbers for one ``corrupt`` call, reproducible per sample.

    Args:
        seed: any Python int (its low 64 bits are used).
        corruption_index: position of the corruption in ``CORRUPTIONS``.
        severity: 1..5.
        sample_ids: ``int64`` tensor ``(B,)`` on the target device; sample ``b`` of the batch
            receives the numbers of sample id ``sample_ids[b]``.

    Each draw names a ``stream`` (a small int chosen by the corruption), so the different
    random quantities of one corruption are independent of each other. Element ``j`` of a
    draw of shape ``shape`` for sample ``b`` is
    ``hash32((hash32(j ^ k1[b, stream]) + k2[b]) mod 2**32)``.
    """

    def __init__(self, seed: int, corruption_index: int, severity: int, sample_ids: torch.Tensor) -> None:
        self.device = sample_ids.device
        self.batch_size = int(sample_ids.shape[0])
        base = hash32_int(seed ^ _GOLDEN)
        base = hash32_int(base ^ (seed >> 32))
        base = hash32_int(base + 0x632BE5AB * (corruption_index + 1))
        base = hash32_int(base + 0x85157AF5 * severity)
        ids = sample_ids.to(torch.int64)
        key = hash32((ids & _MASK) ^ base)
        key = hash32(key ^ ((ids >> 32) & _MASK))
        self._key1 = hash32(key ^ _GOLDEN)  # mixes the element counter in
        self._key2 = hash32(self._key1 + 0x2545F491)  # added between the two rounds
        self._fast = _wrapping_ok(self.device)

    def _stream_key(self, stream: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        key1 = self._key1 if rows is None else self._key1[rows]
        return hash32(key1 ^ hash32_int(0x68E31DA4 + stream * 0x1B56C4E9))

    def _hash_counters(self, counters: torch.Tensor, key1: torch.Tensor, key2: torch.Tensor) -> torch.Tensor:
        """The element hash; returns int32 bit patterns (fast path) or int64 values."""
        if self._fast:
            x = _hash32_wrapping(counters.to(torch.int32) ^ _to_int32_bits(key1))
            x.add_(_to_int32_bits(key2))
            return _hash32_wrapping(x)
        x = hash32(counters.to(torch.int64) ^ key1)
        x.add_(key2).bitwise_and_(_MASK)
        return hash32(x)

    def _raw(self, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        counter = torch.arange(math.prod(shape), device=self.device, dtype=torch.int64)
        x = self._hash_counters(counter[None], self._stream_key(stream)[:, None], self._key2[:, None])
        return x.view(self.batch_size, *shape)

    def _raw_at(self, rows: torch.Tensor, counters: torch.Tensor, stream: int) -> torch.Tensor:
        return self._hash_counters(counters, self._stream_key(stream, rows), self._key2[rows])

    @staticmethod
    def _to_uniform(x: torch.Tensor) -> torch.Tensor:
        # top 23 bits + 1/2: float32-exact values in the open interval (0, 1)
        return (((x >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (2.0**-23)

    def bits(self, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        """Uniform 32-bit integers as ``int64`` in ``[0, 2**32)``, shape ``(B, *shape)``."""
        return self._raw(shape, stream).to(torch.int64) & _MASK

    def uniform(self, shape: tuple[int, ...] = (), stream: int = 0) -> torch.Tensor:
        """Float32 uniforms in the open interval (0, 1), shape ``(B, *shape)``, 23-bit grid."""
        return self._to_uniform(self._raw(shape, stream))

    def uniform_at(self, rows: torch.Tensor, counters: torch.Tensor, stream: int) -> torch.Tensor:
        """The values ``uniform(shape, stream)[rows, counters]`` (flat counters) alone."""
        return self._to_uniform(self._raw_at(rows, counters, stream))

    def normal(self, shape: tuple[int, ...] = (), stream: int = 0) -> torch.Tensor:
        """Standard normal float32 samples, shape ``(B, *shape)`` (Box-Muller, one pair per 2)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform((2, half), stream)
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0]))
        angle = (2.0 * math.pi) * u[:, 1]
        z = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
        return z[:, :n].reshape(self.batch_size, *shape)

    def randint(
        self,
        low: int | torch.Tensor,
        high: int | torch.Tensor,
        shape: tuple[int, ...] = (),
        stream: int = 0,
    ) -> torch.Tensor:
        """Integers uniform in ``[low, high)`` (like NumPy's ``randint``), ``int64 (B, *shape)``.

        ``low``/``high`` may be per-sample tensors broadcastable to ``(B, *shape)``.
        """
        low_t = torch.as_tensor(low, device=self.device)
        span = torch.as_tensor(high, device=self.device) - low_t
        value = torch.floor(self.uniform(shape, stream).to(torch.float64) * span).to(torch.int64)
        return low_t + torch.minimum(value, span - 1)
