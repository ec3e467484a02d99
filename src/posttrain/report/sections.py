"""Which section of a report a logged metric belongs to (loss, rewards, accuracy, KL, ...), by its name, so that
related curves sit together and in the same order in the terminal and on the page."""

from __future__ import annotations

import re

SECTIONS: tuple[tuple[str, str], ...] = (
    ("Loss", r"(^|_)loss$|^loss"),
    ("Rewards", r"^rewards/|_score$|margin|^reward"),
    ("Accuracy", r"accuracy|pass@"),
    ("KL", r"(^|_)kl"),
    ("Entropy", r"entropy"),
    ("Clipping", r"clip"),
    ("Lengths", r"length|^tokens$|^examples$"),
    ("Truncation", r"truncat|dropped"),
    ("Throughput", r"per_s$"),
    ("Time", r"_s$"),
    ("Optimisation", r"^lr$|grad_norm|skipped|logp_gap"),
)
"""(section, pattern): a metric goes to the first section whose pattern it matches, else to "Other"."""

ORDER = [name for name, _ in SECTIONS] + ["Other"]


def section_of(metric: str) -> str:
    for name, pattern in SECTIONS:
        if re.search(pattern, metric):
            return name
    return "Other"


def ordered(keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(kind, metric) keys by section, then train before eval, then name."""
    return sorted(set(keys), key=lambda k: (ORDER.index(section_of(k[1])), k[0] != "train", k[1]))
