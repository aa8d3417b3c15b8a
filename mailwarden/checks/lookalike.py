"""Lookalike and homograph domains: is a domain made to be mistaken for one we protect? No I/O.

Two ways to fool a reader, both checked against the protected set (our hosted
domains and `content.brand_domains`):

* **Homographs.** An IDN whose letters are confusable with Latin ones
  (Cyrillic "\u0430" for "a", Greek "\u03bf" for "o"). Each domain is reduced to a
  *skeleton* (Unicode TR39's idea, with a small bundled table of the common
  Latin/Cyrillic/Greek confusables plus accents stripped and the ASCII tricks
  "0"/"o", "1"/"l", "rn"/"m", "vv"/"w"); equal skeletons with different
  names are a lookalike. A label that mixes Latin with Cyrillic or Greek
  letters is a homograph on its own, whoever it imitates.
* **Typos.** A registrable domain within Damerau-Levenshtein distance 1 of a
  protected one (2 when the protected name is 9 or more characters), e.g.
  "examp1e.org" or "exmaple.org". Names of 4 characters or fewer are too
  short to compare usefully and are skipped as targets.

Input is attacker-chosen: every domain is length-capped, punycode decoding is
guarded, and the distance is banded (O(n * k), not O(n * m)).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import idna

MAX_DOMAIN = 253

# Confusable letters to their Latin look-alike (a subset of Unicode's confusables.txt).
_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j",
    "к": "k", "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t",
    "у": "y", "ѵ": "v", "ԝ": "w", "х": "x", "ү": "y", "з": "3", "ъ": "b", "ь": "b", "п": "n",
    # Greek
    "α": "a", "β": "b", "ϲ": "c", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "μ": "u",
    # Latin extensions and others that survive NFKD
    "ı": "i", "ȷ": "j", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŀ": "l", "ɡ": "g", "ɑ": "a", "ʋ": "u",
}  # fmt: skip
# After the table: ASCII look-alikes, applied to the whole skeleton (order matters: rn before m).
_ASCII_TRICKS = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"), ("|", "l"), ("5", "s"), ("3", "e"))


@dataclass(frozen=True)
class Lookalike:
    domain: str  # as seen (A-labels)
    imitates: str  # the protected domain, or "" for a mixed-script label
    how: str  # "homograph", "mixed-script" or "distance N"


def to_unicode(domain: str) -> str:
    """The U-label form of a domain, or the input lower-cased when it does not decode."""
    domain = domain[:MAX_DOMAIN].lower().rstrip(".")
    labels = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            try:
                label = idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                try:
                    label = label[4:].encode("ascii").decode("punycode")
                except (UnicodeError, ValueError):
                    pass
        labels.append(label)
    return ".".join(labels)


def skeleton(text: str) -> str:
    """A form in which confusable spellings of a name collide."""
    out = []
    for ch in unicodedata.normalize("NFKD", text.lower()):
        if unicodedata.combining(ch):
            continue  # accents: "é" -> "e"
        out.append(_CONFUSABLES.get(ch, ch))
    s = "".join(out)
    for a, b in _ASCII_TRICKS:
        s = s.replace(a, b)
    return s


def _script(ch: str) -> str:
    if ch.isascii():
        return "latin" if ch.isalpha() else ""
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "other"
    for script in ("LATIN", "CYRILLIC", "GREEK"):
        if name.startswith(script):
            return script.lower()
    return "other" if ch.isalpha() else ""


def mixed_script(label: str) -> bool:
    """True when a label mixes Latin letters with Cyrillic or Greek ones (the classic homograph)."""
    scripts = {_script(ch) for ch in label} - {""}
    return "latin" in scripts and bool(scripts & {"cyrillic", "greek"})


def distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, or limit + 1 once it must exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    big = limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [big] * (len(b) + 1)
        cur[0] = i
        lo, hi = max(1, i - limit), min(len(b), i + limit)
        for j in range(lo, hi + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = min(v, big)
        if min(cur[lo - 1 : hi + 1]) > limit:
            return big
        prev2, prev = prev, cur
    return min(prev[len(b)], big)


class LookalikeDetector:
    """Checks domains against a protected set; build once per set, call `check` per domain."""

    def __init__(self, protected: Iterable[str]) -> None:
        self.protected = {d.lower().rstrip(".") for d in protected if d}
        self._skeletons = {skeleton(to_unicode(d)): d for d in self.protected}

    def check(self, domain: str) -> Lookalike | None:
        """A finding for `domain` (a registrable domain, A-labels or U-labels), or None."""
        domain = domain[:MAX_DOMAIN].lower().rstrip(".")
        if not domain or domain in self.protected:
            return None
        uni = to_unicode(domain)
        if uni in self.protected:
            return None
        if any(mixed_script(label) for label in uni.split(".")):
            return Lookalike(domain, "", "mixed-script")
        skel = skeleton(uni)
        target = self._skeletons.get(skel)
        if target is not None:
            return Lookalike(domain, target, "homograph")
        for prot_skel, target in self._skeletons.items():
            name = target.split(".")[0]
            if len(name) <= 4:
                continue
            limit = 2 if len(name) >= 9 else 1
            d = distance(skel, prot_skel, limit)
            if d <= limit:
                return Lookalike(domain, target, f"distance {d}")
        return None
