"""Online learning: pending training events applied to the users' model deltas, in batches.

One server process runs `SpamLearner.run` (worker 0, like the key
housekeeping). Each round takes up to `batch` pending events, works out the
new deltas off the event loop, writes each touched user's changed buckets
and marks the events done; the users' cached deltas in this process are
dropped at once, other workers pick them up when their cache expires.

The features are those the classifier saw at delivery: the stored message
carries our Authentication-Results field, whose results become the same
`auth:` features again (features.auth_from_header).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailwarden.checks.spam import features as feat
from mailwarden.checks.spam.check import UserDeltas
from mailwarden.checks.spam.model import Model, hash_features, learn_one
from mailwarden.logs import log_event


@dataclass
class SpamLearner:
    store: Any  # SpamTraining (storage/interfaces.py)
    model: Model
    deltas: UserDeltas
    authserv_id: str
    interval: float = 5.0
    batch: int = 100
    max_bytes: int = feat.MAX_BYTES

    async def run(self) -> None:
        """Forever: learn what is pending, then wait `interval` seconds (errors are logged, never fatal)."""
        while True:
            try:
                learned = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_event("spam_learn_error", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                learned = 0
            if learned < self.batch:
                await asyncio.sleep(self.interval)

    async def run_once(self) -> int:
        events = await self.store.pending_training_events(self.batch)
        if not events:
            return 0
        users = sorted({e.user for e in events})
        current = {u: await self.store.spam_user_weights(u) for u in users}
        changed = await asyncio.to_thread(self._learn, events, current)
        for user, buckets in changed.items():
            await self.store.spam_set_weights(user, {b: current[user].get(b, 0.0) for b in buckets})
            self.deltas.forget(user)
        await self.store.finish_training_events([e.id for e in events], time.time())
        for user in users:
            labels = [e.label for e in events if e.user == user]
            log_event(
                "spam_learned", user=user or "(site)", spam=labels.count("spam"), ham=labels.count("ham"),
                buckets=len(changed.get(user, ())),
            )  # fmt: skip
        return len(events)

    def _learn(self, events: Sequence[Any], current: dict[str, dict[int, float]]) -> dict[str, set[int]]:
        """Apply the events in order to copies of the users' deltas; returns the buckets each user changed."""
        changed: dict[str, set[int]] = {}
        for e in events:
            buckets = learn_buckets(self.model, e.message, self.authserv_id, self.max_bytes)
            if learn_one(self.model, buckets, 1 if e.label == "spam" else 0, current[e.user]):
                changed.setdefault(e.user, set()).update(buckets)
        return changed


def learn_buckets(model: Model, message: bytes, authserv_id: str, max_bytes: int = feat.MAX_BYTES) -> list[int]:
    """The buckets a stored message had when it arrived: our own trace fields (authserv-id = our
    hostname) removed, the auth features read back from our Authentication-Results."""
    auth: list[tuple[str, str]] = []
    if authserv_id:
        auth = feat.auth_from_header(message, authserv_id)
        message = feat.strip_own_trace(message, authserv_id)
    return hash_features(feat.extract(message, auth, max_bytes), model.bits)
