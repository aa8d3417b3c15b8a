"""Choosing the classifier's settings by cross-validation on the corpus's training part only.

    python -m mailwarden.checks.spam.tune CORPUS_DIR [--folds 5] [--repeats 3] [--ham-weights 1,2,3,5]

The objective, fixed before any run: the lowest pooled out-of-fold cost

    cost = COST_HAM_FP * (ham called spam) + 1 * (spam let through)

with COST_HAM_FP = 10 (a ham sent to Junk costs as much as ten spams in the
inbox, the usual weighting for spam filters), ties going to fewer ham false
positives, then to the smaller ham weight and threshold. It is searched over
the ham weight of training (`model.train`: the gradient of a ham example is
multiplied by it) and the decision threshold `spam.spam_probability`
(a coarse grid, so the choice does not chase single messages).

Only the training part (`corpus.split`) is read; the held-out fifth that
bench/spam scores is never opened. Folds are a second hash of the file name
(sha256 byte 1 + r mod `folds` for the r-th of `repeats` partitions, whose
counts are summed: one partition's few false positives are too noisy to
choose by), independent of the held-out split (byte 0).
Each fold's model is trained on the other folds exactly as the shipped model
is trained (evaluate.train_global's settings), and the out-of-fold
probabilities of all folds are pooled before counting.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mailwarden.checks.spam import features as feat
from mailwarden.checks.spam.corpus import Labelled, read_labels, read_message, split
from mailwarden.checks.spam.evaluate import EPOCHS, L2, RATE
from mailwarden.checks.spam.model import DEFAULT_BITS, hash_features, sigmoid, train

COST_HAM_FP = 10.0
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)


def fold_of(item: Labelled, folds: int, repeat: int = 0) -> int:
    """The item's fold in the `repeat`-th partition: sha256 byte 1 + repeat (byte 0 is the held-out split)."""
    return hashlib.sha256(item.path.name.encode()).digest()[1 + repeat] % folds


def out_of_fold(
    examples: Sequence[tuple[list[int], int]], folds: Sequence[int], k: int, ham_weight: float, l2: float = L2
) -> list[float]:
    """Each example's spam probability from the model trained on the other folds."""
    probs = [0.0] * len(examples)
    for f in range(k):
        fit = [e for e, g in zip(examples, folds, strict=True) if g != f]
        model = train(fit, DEFAULT_BITS, epochs=EPOCHS, rate=RATE, l2=l2, ham_weight=ham_weight)
        for n, (e, g) in enumerate(zip(examples, folds, strict=True)):
            if g == f:
                probs[n] = sigmoid(model.logit(e[0]))
    return probs


def counts(probs: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, float]:
    tp = sum(1 for p, y in zip(probs, labels, strict=True) if y and p >= threshold)
    fn = sum(labels) - tp
    fp = sum(1 for p, y in zip(probs, labels, strict=True) if not y and p >= threshold)
    ham = len(labels) - sum(labels)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"fp": fp, "fn": fn, "ham": ham, "f1": f1, "fp_rate": fp / ham, "cost": COST_HAM_FP * fp + fn}


def main(argv: list[str] | None = None, extra: Callable[[bytes], list[bytes]] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--ham-weights", default="1,2,3,5")
    p.add_argument("--repeats", type=int, default=3, help="partitions into folds, counts summed over them")
    p.add_argument("--l2", type=float, default=L2)
    args = p.parse_args(argv)
    training, held = split(read_labels(args.corpus / "labels.csv"))
    examples = []
    for item in training:
        message = read_message(item.path)
        found = feat.extract(message) + (extra(message) if extra else [])
        examples.append((hash_features(found), int(item.spam)))
    labels = [y for _, y in examples]
    print(f"training part: {len(training)} messages ({sum(labels)} spam); {len(held)} held out, not read")
    print(
        f"objective: min {COST_HAM_FP:g}*FP + FN, pooled over {args.folds} folds x {args.repeats} partitions; "
        f"l2 {args.l2:g}; counts are summed over the partitions"
    )
    print(f"{'ham_w':>6} {'thresh':>7} {'FP':>4} {'FN':>4} {'FP rate':>8} {'F1':>7} {'cost':>6}")
    best: tuple[float, int, float, float] | None = None
    for ham_weight in (float(w) for w in args.ham_weights.split(",")):
        runs = []
        for r in range(args.repeats):
            folds = [fold_of(i, args.folds, r) for i in training]
            runs.append(out_of_fold(examples, folds, args.folds, ham_weight, args.l2))
        for t in THRESHOLDS:
            c = counts([p for run in runs for p in run], labels * args.repeats, t)
            print(f"{ham_weight:6g} {t:7g} {c['fp']:4d} {c['fn']:4d} {c['fp_rate']:8.4f} {c['f1']:7.4f} {c['cost']:6g}")
            key = (c["cost"], c["fp"], ham_weight, t)
            if best is None or key < best:
                best = key
        sys.stdout.flush()
    assert best is not None
    print(f"chosen: ham weight {best[2]:g}, threshold {best[3]:g} (cost {best[0]:g}, {best[1]} ham FP)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
