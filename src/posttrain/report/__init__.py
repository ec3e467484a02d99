"""Runs a person looks at and compares: `posttrain report` (sparklines in the terminal; an HTML page and PNG plots)
and `posttrain compare` (AdaStop's multi-seed comparison)."""

from posttrain.report.runs import RunData, labels_for, load_run, smooth, sparkline

__all__ = ["RunData", "labels_for", "load_run", "smooth", "sparkline"]
