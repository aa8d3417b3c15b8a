"""The built-in spam classifier (docs/content.md, "Spam classifier").

`features.py` turns a message into bounded named features, `model.py` is the
hashed logistic regression (global model plus per-user deltas), `check.py`
the async check the pipeline runs, `learner.py` applies Junk training events
to the per-user models, `corpus.py` reads labelled folders and makes the
deterministic train/held-out split, `evaluate.py` the figures `spam eval`
and bench/spam print.
"""
