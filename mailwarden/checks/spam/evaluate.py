"""Training the global model from labelled files, and the figures an evaluation prints.

`spam eval`, bench/spam and the model build (checks/spam/build.py) share
these, so the numbers in docs/performance.md mean the same thing everywhere:
a message is called spam when the classifier says "spam" (the probability
reaches `spam.spam_probability`); "unsure" counts as not spam, as it is
delivered to the inbox unless another check adds to its score.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailwarden.checks.spam import features as feat
from mailwarden.checks.spam.check import SpamCheck
from mailwarden.checks.spam.corpus import Labelled, read_message
from mailwarden.checks.spam.model import DEFAULT_BITS, Model, hash_features, train

# The shipped model's training settings (chosen by cross-validation on the training part: checks/spam/tune.py).
EPOCHS = 6
RATE = 0.2
L2 = 1e-5
HAM_WEIGHT = 5.0


@dataclass
class Scores:
    tp: int = 0  # spam called spam
    fp: int = 0  # ham called spam
    tn: int = 0
    fn: int = 0
    seconds: float = 0.0  # classification time only (not reading files)
    errors: list[str] = field(default_factory=list)

    def add(self, is_spam: bool, said_spam: bool) -> None:
        if is_spam:
            self.tp += said_spam
            self.fn += not said_spam
        else:
            self.fp += said_spam
            self.tn += not said_spam

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.total if self.total else 0.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def ham_fp_rate(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        return [
            f"messages      {self.total} ({self.tp + self.fn} spam, {self.tn + self.fp} ham)",
            f"accuracy      {self.accuracy:.4f}",
            f"precision     {self.precision:.4f}",
            f"recall        {self.recall:.4f}",
            f"F1            {self.f1:.4f}",
            f"ham FP rate   {self.ham_fp_rate:.4f} ({self.fp} of {self.fp + self.tn} ham called spam)",
            f"msgs/s        {self.msgs_per_s:.0f}",
        ]


def train_global(
    items: Sequence[Labelled], bits: int = DEFAULT_BITS, progress: Callable[[int, int], None] | None = None
) -> Model:
    """A global model from labelled files (deterministic: same files, same model)."""
    examples = []
    for n, item in enumerate(items):
        buckets = hash_features(feat.extract(read_message(item.path)), bits)
        examples.append((buckets, int(item.spam)))
        if progress is not None and n % 100 == 0:
            progress(n, len(items) * 2)

    def half(done: int, total: int) -> None:
        if progress is not None:
            progress(len(items) + done * len(items) // max(total, 1), len(items) * 2)

    model = train(examples, bits, epochs=EPOCHS, rate=RATE, l2=L2, progress=half, ham_weight=HAM_WEIGHT)
    if progress is not None:
        progress(len(items) * 2, len(items) * 2)
    return model


async def evaluate(check: SpamCheck, items: Sequence[Labelled], users: Sequence[str] = ()) -> Scores:
    """Classify each file (read first, then timed) as inbound mail and count the outcomes."""
    scores = Scores()
    for item in items:
        try:
            message = read_message(item.path)
        except OSError as exc:
            scores.errors.append(f"{item.path}: {exc.strerror}")
            continue
        started = time.perf_counter()
        result = await check.check(message, "inbound", users=users)
        scores.seconds += time.perf_counter() - started
        scores.add(item.spam, result.result == "spam")
    return scores


def evaluate_sync(check: SpamCheck, items: Sequence[Labelled], users: Sequence[str] = ()) -> Scores:
    return asyncio.run(evaluate(check, items, users))


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line text progress bar on stderr."""
    import sys

    last = [-1]

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        if filled == last[0]:
            return
        last[0] = filled
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1):3d}%{end}")
        sys.stderr.flush()

    return show


def write_model(model: Model, path: Path) -> int:
    data = model.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)
