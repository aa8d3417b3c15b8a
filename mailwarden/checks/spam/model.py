"""The classifier: logistic regression over hashed features, a global model plus per-user deltas.

Each feature name is hashed (CRC-32, so the same in every process; Python's
own `hash` is salted per process) into one of 2**bits buckets, and the
spam log-odds of a message are

    z = bias + sum(global[h]) + sum(user[h])    over the message's distinct buckets h

with the probability sigmoid(z). The global weights are a dense float array
(4 MiB for 2**20 buckets), loaded once per process from a compact file; the
user's are a small dict of the buckets their own training moved.

Training the global model (`train`) is plain online logistic regression with
AdaGrad step sizes and a little L2, over a fixed number of passes in an order
drawn from a seeded generator: the same corpus always gives the same file.
A user's (or the site's) delta learns one message at a time (`learn_one`): a
passive-aggressive step, the smallest change to the message's buckets that
gives it the wanted log-odds, so one Junk move is enough to move similar mail.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
import zlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BITS = 20
_MAGIC = b"MWSPAM1\x00"
_HEADER = struct.Struct("<8sBfIf")  # magic, bits, bias, count, scale
LEARN_TARGET = 4.0  # log-odds a training event pushes its message to (p = 0.982 / 0.018)
MAX_DELTA = 4.0  # a user's delta per bucket is kept within +-MAX_DELTA


def hash_features(features: Iterable[bytes], bits: int = DEFAULT_BITS) -> list[int]:
    """Distinct buckets of the features (collisions merge, as hashing intends)."""
    mask = (1 << bits) - 1
    crc = zlib.crc32
    return list({crc(f) & mask for f in features})


def name_buckets(features: Iterable[bytes], bits: int = DEFAULT_BITS) -> dict[int, bytes]:
    """bucket -> one feature name in it (for explanations); its keys are `hash_features`."""
    mask = (1 << bits) - 1
    crc = zlib.crc32
    return {crc(f) & mask: f for f in features}


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-min(z, 60.0)))
    e = math.exp(max(z, -60.0))
    return e / (1.0 + e)


@dataclass
class Model:
    """The global weights: a dense array of 2**bits floats and a bias."""

    bits: int
    bias: float
    weights: array  # array('f')

    @classmethod
    def empty(cls, bits: int = DEFAULT_BITS) -> Model:
        return cls(bits, 0.0, array("f", bytes(4 << bits)))

    def logit(self, buckets: Sequence[int], delta: Mapping[int, float] | None = None) -> float:
        w = self.weights
        z = self.bias + sum(map(w.__getitem__, buckets))
        if delta:
            get = delta.get
            z += sum(get(h, 0.0) for h in buckets)
        return z

    def contributions(
        self, named: Mapping[int, bytes], delta: Mapping[int, float] | None = None, top: int = 6
    ) -> list[tuple[str, float]]:
        """The features that pushed hardest either way, for `inspect`: (name, weight), from bucket -> name."""
        w = self.weights
        if delta:
            get = delta.get
            weight = lambda h: w[h] + get(h, 0.0)  # noqa: E731
        else:
            weight = w.__getitem__
        best = heapq.nlargest(top, named, key=lambda h: abs(weight(h)))
        return [(named[h].decode("utf-8", "replace"), round(weight(h), 3)) for h in best if weight(h)]

    # ---- the file format: sparse, int16-quantised, zlib-compressed ------------

    def to_bytes(self) -> bytes:
        nonzero = [(i, w) for i, w in enumerate(self.weights) if w]
        scale = max((abs(w) for _, w in nonzero), default=1.0) / 32767.0 or 1.0
        idx = array("I", [i for i, _ in nonzero])
        prev = 0
        for k in range(len(idx)):  # delta-encode the sorted indices: they compress far better
            idx[k], prev = idx[k] - prev, idx[k]
        vals = array("h", [round(w / scale) for _, w in nonzero])
        if idx.itemsize != 4 or vals.itemsize != 2:  # pragma: no cover - every CPython platform we run on
            raise RuntimeError("unexpected array item sizes")
        body = idx.tobytes() + vals.tobytes()
        header = _HEADER.pack(_MAGIC, self.bits, self.bias, len(nonzero), scale)
        return header + zlib.compress(body, 9)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Model:
        magic, bits, bias, count, scale = _HEADER.unpack_from(blob)
        if magic != _MAGIC or not 8 <= bits <= 26:
            raise ValueError("not a Mailwarden spam model file")
        body = zlib.decompress(blob[_HEADER.size :])
        if len(body) != count * 6:
            raise ValueError("truncated spam model file")
        idx = array("I")
        idx.frombytes(body[: count * 4])
        vals = array("h")
        vals.frombytes(body[count * 4 :])
        weights = array("f", bytes(4 << bits))
        at = 0
        for step, v in zip(idx, vals, strict=True):
            at += step
            weights[at] = v * scale
        return cls(bits, bias, weights)

    @classmethod
    def load(cls, path: Path) -> Model:
        return cls.from_bytes(path.read_bytes())


def shipped_model_path() -> Path:
    return Path(__file__).resolve().parents[2] / "data" / "spam_model.bin"


def train(
    examples: Sequence[tuple[Sequence[int], int]],
    bits: int = DEFAULT_BITS,
    epochs: int = 6,
    rate: float = 0.2,
    l2: float = 1e-5,
    seed: int = 1,
    progress: object = None,
    ham_weight: float = 1.0,
) -> Model:
    """A global model from (buckets, label) pairs, label 1 for spam: deterministic for a given input."""
    model = Model.empty(bits)
    w = [0.0] * (1 << bits)
    g2 = [1e-8] * (1 << bits)
    bias, bias_g2 = 0.0, 1e-8
    order = list(range(len(examples)))
    rng = random.Random(seed)
    for epoch in range(epochs):
        rng.shuffle(order)
        for n, k in enumerate(order):
            buckets, y = examples[k]
            z = bias + sum(w[h] for h in buckets)
            g = sigmoid(z) - y
            if not y:
                g *= ham_weight  # a ham called spam costs more than a spam let through
            bias_g2 += g * g
            bias -= rate * g / math.sqrt(bias_g2)
            gg = g * g
            for h in buckets:
                g2[h] += gg
                w[h] -= rate * (g + l2 * w[h]) / math.sqrt(g2[h])
            if progress is not None and n % 200 == 0:
                progress(epoch * len(order) + n, epochs * len(order))  # type: ignore[operator]
    model.bias = bias
    model.weights = array("f", w)
    return model


def learn_one(
    model: Model, buckets: Sequence[int], label: int, delta: dict[int, float], target: float = LEARN_TARGET
) -> bool:
    """Move `delta` so this message scores at least `target` log-odds its way; True if anything changed.

    A passive-aggressive step: nothing changes when the message already
    scores that way, else each of its buckets moves by the same amount, the
    least change that reaches the target (each bucket's delta is clipped).
    """
    if not buckets:
        return False
    sign = 1.0 if label else -1.0
    z = model.logit(buckets, delta)
    gap = target - sign * z
    if gap <= 1e-6:  # already there (up to rounding)
        return False
    step = sign * gap / len(buckets)
    for h in buckets:
        delta[h] = max(-MAX_DELTA, min(MAX_DELTA, delta.get(h, 0.0) + step))
    return True
