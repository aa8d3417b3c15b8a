"""Build the shipped global model from the corpus's training part only.

    python -m mailwarden.checks.spam.build CORPUS_DIR [--out mailwarden/data/spam_model.bin]

CORPUS_DIR holds labels.csv (path,label[,group]). The held-out fifth
(corpus.held_out: a hash of the file name) is never read, so bench/spam,
which scores that fifth, measures the shipped model honestly. The output is
deterministic: the same corpus gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from mailwarden.checks.spam.corpus import read_labels, split
from mailwarden.checks.spam.evaluate import progress_bar, train_global, write_model
from mailwarden.checks.spam.model import shipped_model_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--out", type=Path, default=shipped_model_path())
    args = p.parse_args(argv)
    training, held = split(read_labels(args.corpus / "labels.csv"))
    model = train_global(training, progress=progress_bar("training"))
    size = write_model(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    print(
        f"trained on {len(training)} messages ({len(held)} held out, not read); {args.out}: {size} bytes sha256 {digest}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
