"""The spam check: the classifier's probability as a `CheckResult`.

Result "spam" (probability at or above `spam.spam_probability`) suggests
Junk; "unsure" adds a score that grows with the probability up to just
under `inbound.junk_score`, so it tips the verdict only together with some
other signal (an SPF softfail, a block-listed link); "ham" adds nothing.
Outbound mail is judged by the global and site model only (no sender's
personal model, no authentication features), and only a probability at or
above `spam.outbound_probability` asks to hold it.

Inbound, the check runs after SPF, DKIM, ARC and DMARC (pipeline/inbound.py)
so their results are features; for a message to one local account that
account's personal model is added on top of the global one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mailwarden.checks.offload import run_cpu_bound
from mailwarden.checks.result import Action, CheckResult
from mailwarden.checks.spam import features as feat
from mailwarden.checks.spam.model import Model, name_buckets, shipped_model_path, sigmoid

# SpamAssassin's test string: any message carrying it is spam, so an administrator can test the setup.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SITE = ""  # the "user" whose delta applies to everyone: the site-wide adjustments (`spam train` without --user)


class SpamWeights(Protocol):
    async def spam_user_weights(self, user: str) -> dict[int, float]: ...


@dataclass(frozen=True)
class SpamSettings:
    spam_probability: float = 0.8  # = config's default (chosen by checks/spam/tune.py)
    unsure_probability: float = 0.5
    outbound_probability: float = 0.99
    unsure_max_score: float = 4.5
    max_bytes: int = feat.MAX_BYTES
    cache_seconds: float = 30.0

    @classmethod
    def from_config(cls, config: Any) -> SpamSettings:
        return cls(
            spam_probability=config.get("spam.spam_probability"),
            unsure_probability=config.get("spam.unsure_probability"),
            outbound_probability=config.get("spam.outbound_probability"),
            unsure_max_score=config.get("spam.unsure_max_score"),
            max_bytes=config.get("spam.max_scan_bytes"),
            cache_seconds=config.get("spam.user_model_cache_seconds"),
        )


_MODELS: dict[Path, Model] = {}


def load_model(path: Path | None = None) -> Model:
    """The global model from `path` (default: the one shipped in the package), loaded once per process."""
    path = (path or shipped_model_path()).resolve()
    if path not in _MODELS:
        _MODELS[path] = Model.load(path)
    return _MODELS[path]


@dataclass
class UserDeltas:
    """Per-user (and site) deltas read from storage, cached for a few seconds per process.

    The learner (checks/spam/learner.py) in this process drops an entry as
    soon as it changes it; other worker processes see the change when their
    cached copy expires.
    """

    store: SpamWeights | None
    ttl: float = 30.0
    _cache: dict[str, tuple[float, dict[int, float]]] = field(default_factory=dict)

    async def get(self, user: str) -> dict[int, float]:
        if self.store is None:
            return {}
        now = time.monotonic()
        hit = self._cache.get(user)
        if hit is not None and hit[0] > now:
            return hit[1]
        weights = await self.store.spam_user_weights(user)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[user] = (now + self.ttl, weights)
        return weights

    def forget(self, user: str) -> None:
        self._cache.pop(user, None)

    async def combined(self, user: str | None) -> dict[int, float]:
        site = await self.get(SITE)
        if not user:
            return site
        own = await self.get(user)
        if not site:
            return own
        if not own:
            return site
        merged = dict(site)
        for h, w in own.items():
            merged[h] = merged.get(h, 0.0) + w
        return merged


class SpamCheck:
    """The content-stage check (pipeline/content.py `ContentCheck`), with the classifier's extras."""

    name = "spam"
    uses_auth = True  # inbound, run after the authentication checks with their results (pipeline/inbound.py)

    def __init__(self, model: Model, deltas: UserDeltas | None = None, settings: SpamSettings | None = None) -> None:
        self.model = model
        self.deltas = deltas or UserDeltas(None)
        self.settings = settings or SpamSettings()

    async def check(
        self,
        message: bytes,
        direction: str,
        auth: Sequence[CheckResult] = (),
        users: Sequence[str] = (),
    ) -> CheckResult:
        started = time.monotonic()
        s = self.settings
        pairs = feat.auth_pairs(auth) if direction == "inbound" else []
        found = await run_cpu_bound(len(message), lambda: feat.extract(message, pairs, s.max_bytes))
        user = users[0] if direction == "inbound" and len(users) == 1 else None
        delta = await self.deltas.combined(user)
        named = name_buckets(found, self.model.bits)
        p = sigmoid(self.model.logit(list(named), delta))
        gtube = GTUBE in message[: s.max_bytes]
        if gtube:
            p = 1.0
        result = self.classify(p, direction)
        score = 0.0
        action = Action.NONE
        if result == "spam":
            action = Action.JUNK
            score = s.unsure_max_score
        elif result == "unsure":
            span = max(s.spam_probability - s.unsure_probability, 1e-9)
            score = round(min(s.unsure_max_score, s.unsure_max_score * (p - s.unsure_probability) / span), 2)
        details = {
            "probability": round(p, 4),
            "model": "global+user" if user and delta else ("global+site" if delta else "global"),
            "user": user or "",
            "features": len(found),
            "top_features": self.model.contributions(named, delta),
        }
        return CheckResult(
            check="spam",
            result=result,
            reason="GTUBE test string" if gtube else f"spam probability {p:.3f}",
            action=action,
            score=score,
            details=details,
            elapsed=time.monotonic() - started,
        )

    def classify(self, p: float, direction: str) -> str:
        s = self.settings
        threshold = s.outbound_probability if direction == "outbound" else s.spam_probability
        if p >= threshold:
            return "spam"
        if p >= s.unsure_probability:
            return "unsure"
        return "ham"


def spam_check_from_config(config: Any, store: SpamWeights | None) -> SpamCheck:
    """The check as `spam.*` configures it; `store` holds the site and per-user deltas (None: global only)."""
    settings = SpamSettings.from_config(config)
    name = config.get("spam.model")
    path = None
    if name:
        path = Path(name)
        if not path.is_absolute():
            path = config.instance_dir / path
    return SpamCheck(load_model(path), UserDeltas(store, settings.cache_seconds), settings)
