"""Labelled message folders: the corpus's labels.csv, and the deterministic train/held-out split.

The split is by a hash of each file's name, so it never depends on the order
files are listed in, and the shipped model (built from the training part
only) and `bench/spam` (which scores the held-out part) agree on it.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_BUCKETS = 5  # one in five files is held out


@dataclass(frozen=True)
class Labelled:
    path: Path
    spam: bool


def held_out(name: str) -> bool:
    """True for the files the bench evaluates on (about a fifth), chosen by a hash of the file name."""
    return hashlib.sha256(Path(name).name.encode()).digest()[0] % HELD_OUT_BUCKETS == 0


def read_labels(csv_path: Path, root: Path | None = None) -> list[Labelled]:
    """Rows of a labels.csv (`path,label[,group]`, label spam or ham), paths relative to its folder or `root`."""
    base = root if root is not None else csv_path.parent
    items = []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            label = (row.get("label") or "").strip().lower()
            if label not in ("spam", "ham"):
                raise ValueError(f"{csv_path}: label must be spam or ham, got {label!r} for {row.get('path')}")
            items.append(Labelled(base / row["path"], label == "spam"))
    items.sort(key=lambda item: str(item.path))
    return items


def split(items: list[Labelled]) -> tuple[list[Labelled], list[Labelled]]:
    """(training part, held-out part)."""
    train = [i for i in items if not held_out(i.path.name)]
    test = [i for i in items if held_out(i.path.name)]
    return train, test


def message_files(folder: Path) -> Iterator[Path]:
    """Every regular file under `folder`, in name order (hidden files and labels.csv skipped)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".csv" and path.name != "NOTICE":
            yield path


def read_message(path: Path) -> bytes:
    """A message file with CRLF line endings (an mbox "From " line dropped), as SMTP would carry it."""
    raw = path.read_bytes()
    if raw.startswith(b"From ") and b"\n" in raw:
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
