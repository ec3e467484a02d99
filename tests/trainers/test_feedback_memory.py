"""The preference and reward-model data phase keeps the tokens, not the file's rows (issue #21, item 7)."""

import json
import tracemalloc
from pathlib import Path

from posttrain.config import validate
from posttrain.config.pref import PrefConfig
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.splits import load_feedback

MODEL = {"preset": "qwen2-small", "tokenizer": "arithmetic"}


def test_reading_pairs_keeps_the_tokens_not_every_rows_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(20_000):  # a wide column no loss reads: it must not stay in memory
            f.write(json.dumps({"prompt": f"{i % 90 + 10}+{i % 7}=", "chosen": "12", "rejected": "13",
                                "note": "x" * 40}) + "\n")  # fmt: skip
    cfg = validate(PrefConfig, {"model": MODEL, "data": {"train": str(path)}})
    tracemalloc.start()
    try:
        split = load_feedback(cfg.data, "preference", "train", build_builtin_tokenizer("arithmetic"), seed=0,
                              recipe_dir=None)  # fmt: skip
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert split.report.rows == len(split.tokens) == 20_000
    assert kept < 7 * path.stat().st_size  # the rows' dicts kept beside the tokens made it about 12 times


def test_the_margin_column_is_kept_by_row(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5}, {"prompt": "2+2=", "chosen": "4",
            "rejected": "5"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate(PrefConfig, {"model": MODEL, "data": {"train": str(path)}})
    split = load_feedback(cfg.data, "preference", "train", build_builtin_tokenizer("arithmetic"), seed=0,
                          recipe_dir=None)  # fmt: skip
    assert split.margins == {split.tokens[0].where: 0.5}
