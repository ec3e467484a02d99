"""The Python API: one function per CLI command, taking objects (configs, models, rows, reward callables).

    import posttrain
    result = posttrain.sft({"model": {"path": "my-model"}, "data": {"train": "train.jsonl"}})
    posttrain.evaluate({"model": {"path": str(result.final_dir)}, "data": {"eval": "eval.jsonl"}})

A config may be a config object, a dict, or a path to a YAML recipe (plus `overrides`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from pydantic import BaseModel

from posttrain.config import ConfigError, EvalConfig, PrefConfig, RLConfig, RMConfig, SFTConfig, load_config
from posttrain.data.encoding import encode_prompt
from posttrain.data.errors import DataError
from posttrain.objectives.registry import ALL_REGISTRIES
from posttrain.policies import MODEL_PRESETS, load_model, load_tokenizer, save_pretrained
from posttrain.policies.models import adapter_base_path
from posttrain.rewards import BUILTIN_REWARDS
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.runtime.checkpoint import model_dir, write_atomically
from posttrain.runtime.logging import read_metrics
from posttrain.runtime.model_files import is_adapter_directory
from posttrain.tasks import TASKS, WRITTEN_TASKS, build_builtin_tokenizer
from posttrain.trainers.evaluation import EvalResult, RewardFn, run_evaluation
from posttrain.trainers.lifecycle import RunResult, make_output_dir
from posttrain.trainers.preference import train_pref
from posttrain.trainers.reward_model import train_rm
from posttrain.trainers.rl import train_rl
from posttrain.trainers.sft import train_sft

C = TypeVar("C", bound=BaseModel)

# transformers prints a progress bar for every save and load; posttrain shows its own progress.
transformers.utils.logging.disable_progress_bar()


def as_config(kind: type[C], config: C | dict[str, Any] | str | Path, overrides: Sequence[str] = ()) -> C:
    """A config object from an object, a mapping or a YAML recipe, with `overrides` applied as the CLI applies
    them (an override replaces what it names, and the keys that name the same thing: `config.loading.REPLACES`)."""
    if isinstance(config, kind):
        if not overrides:
            return config
        # only what was set: a default re-read as if the user had written it could clash with an override
        internal = {"recipe_dir": config.recipe_dir, "load_notes": config.load_notes}
        base = config.model_dump(exclude_unset=True) | internal
        return load_config(kind, base, overrides)
    if isinstance(config, BaseModel):
        raise ConfigError(f"a {type(config).__name__} was given where a {kind.__name__} (or a dict or YAML path) is "
                          "needed")  # fmt: skip
    return load_config(kind, config, overrides)


def sft(
    config: SFTConfig | dict[str, Any] | str | Path,
    *,
    overrides: list[str] = (),
    model: Any = None,
    tokenizer: Any = None,
    train: Any = None,
    eval: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Supervised fine-tuning (`posttrain sft`). `train`/`eval`: lists of row dicts or `datasets.Dataset`."""
    return train_sft(
        as_config(SFTConfig, config, overrides),
        model=model,
        tokenizer=tokenizer,
        train_rows=train,
        eval_rows=eval,
        resume=resume,
        progress=progress,
    )


def rl(
    config: RLConfig | dict[str, Any] | str | Path,
    *,
    overrides: list[str] = (),
    model: Any = None,
    tokenizer: Any = None,
    train: Any = None,
    eval: Any = None,
    rewards: list[Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Online RL (`posttrain rl`). `rewards`: TRL-style callables or `RewardSpec`s replacing the config's."""
    return train_rl(
        as_config(RLConfig, config, overrides),
        model=model,
        tokenizer=tokenizer,
        train_rows=train,
        eval_rows=eval,
        rewards=rewards,
        resume=resume,
        progress=progress,
    )


def pref(
    config: PrefConfig | dict[str, Any] | str | Path,
    *,
    overrides: list[str] = (),
    model: Any = None,
    tokenizer: Any = None,
    train: Any = None,
    eval: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Preference optimisation (`posttrain pref`): offline on preference rows, or in rounds on the policy's own
    samples when the config has an `online` section (then `train`/`eval` are prompt rows with `answer`...).
    `train`/`eval`: row dicts or a `datasets.Dataset`."""
    return train_pref(
        as_config(PrefConfig, config, overrides),
        model=model,
        tokenizer=tokenizer,
        train_rows=train,
        eval_rows=eval,
        resume=resume,
        progress=progress,
    )


def rm(
    config: RMConfig | dict[str, Any] | str | Path,
    *,
    overrides: list[str] = (),
    model: Any = None,
    tokenizer: Any = None,
    train: Any = None,
    eval: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Reward-model training (`posttrain rm`). `train`/`eval`: row dicts or a `datasets.Dataset`."""
    return train_rm(
        as_config(RMConfig, config, overrides),
        model=model,
        tokenizer=tokenizer,
        train_rows=train,
        eval_rows=eval,
        resume=resume,
        progress=progress,
    )


def evaluate(
    config: EvalConfig | dict[str, Any] | str | Path,
    *,
    overrides: list[str] = (),
    model: Any = None,
    tokenizer: Any = None,
    rows: Any = None,
    reward: RewardFn | None = None,
) -> EvalResult:
    """Greedy accuracy and pass@k (`posttrain eval`). `reward`: a TRL-style reward callable."""
    return run_evaluation(
        as_config(EvalConfig, config, overrides), model=model, tokenizer=tokenizer, rows=rows, reward=reward
    )


@torch.inference_mode()
def generate(
    model: Any,
    prompts: list[str],
    *,
    tokenizer: Any = None,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    chat: bool = False,
    seed: int = 0,
    engine: str = "native",
) -> list[list[str]]:
    """`n` completions for each prompt (`posttrain generate`). `model`: a model object or a local directory."""
    if isinstance(model, str | Path):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model)
    if tokenizer is None:
        raise ValueError("generate: pass tokenizer= with a model object")
    if n < 1:
        raise DataError(f"generate: n={n}; give at least 1 completion per prompt")
    model.eval()
    prompt_ids = [
        encode_prompt(tokenizer, [{"role": "user", "content": p}] if chat else p, where=f"prompt {i + 1}")
        for i, p in enumerate(prompts)
    ]
    for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        if not ids:
            raise DataError(f"generate: prompt {i + 1} ({prompt!r}) has no tokens, and this tokenizer adds none "
                            "(no BOS): give it some text")  # fmt: skip
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=(tokenizer.eos_token_id,),
    )
    generator = torch.Generator(device=model.device).manual_seed(seed)
    rollouts = ENGINES[engine].generate(model, prompt_ids, params, n=n, generator=generator, tokenizer=tokenizer)
    texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def export(
    run_dir: str | Path, *, merge: bool = False, checkpoint: str | None = None, output: str | Path | None = None
) -> Path:
    """A standalone Hugging Face model directory from a run (`posttrain export`): its `final/`, or a checkpoint's
    model (`checkpoint`: a step number or a directory name such as step-00000100). A LoRA run saves its adapter
    only; `merge` merges it into its base. Written to `output` (default: RUN/merged or RUN/exported), atomically."""
    run = Path(run_dir)
    source = run / "final" if checkpoint is None else model_dir(checkpoint_dir(run, checkpoint))
    if not source.is_dir():
        raise ConfigError(f"export: {source} does not exist (is {run} a finished posttrain run?)")
    adapter = is_adapter_directory(source)
    if adapter and not merge:
        raise ConfigError(f"export: {source} holds a LoRA adapter only; add --merge to merge it into its base "
                          f"({adapter_base_path(source)})")  # fmt: skip
    model = load_model(source)  # an adapter directory loads as its base with the adapter merged
    out = Path(output) if output is not None else run / ("merged" if adapter else "exported")
    write_atomically(out, lambda staging: save_pretrained(model, load_tokenizer(source), staging))
    return out


def checkpoint_dir(run: Path, checkpoint: str) -> Path:
    """A run's checkpoint directory by step number (`100`) or name (`step-00000100`)."""
    name = f"step-{int(checkpoint):08d}" if checkpoint.isdigit() else checkpoint
    path = run / "checkpoints" / name
    if not path.is_dir():
        found = ", ".join(sorted(p.name for p in (run / "checkpoints").glob("step-*"))) or "none"
        raise ConfigError(f"export: no checkpoint {name} in {run / 'checkpoints'}; found: {found}")
    return path


def write_task(
    name: str,
    out_dir: str | Path,
    *,
    digits: int | None = None,
    operators: str | None = None,
    train_size: int = 20000,
    eval_size: int = 500,
    think_fraction: float | None = None,
    wrong_fraction: float = 0.0,
    seed: int = 0,
) -> list[Path]:
    """A built-in task's train.jsonl, eval.jsonl and tokenizer/ (`posttrain task`). digits, operators and
    think_fraction are the arithmetic task's (None: its defaults)."""
    arithmetic = {"digits": digits, "operators": operators, "think_fraction": think_fraction}
    given = {key: value for key, value in arithmetic.items() if value is not None}
    if name not in TASKS:
        raise ConfigError(f"posttrain task: unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    if name not in WRITTEN_TASKS:
        raise ConfigError(f"posttrain task {name!r}: writes {', '.join(WRITTEN_TASKS)} only; a recipe's data.task "
                          f"generates the others ({', '.join(sorted(TASKS))})")  # fmt: skip
    if given and name != "arithmetic":
        raise ConfigError(f"posttrain task {name}: {', '.join(given)} are settings of the arithmetic task")
    try:
        task = TASKS[name](**given, wrong_fraction=wrong_fraction)
    except ValueError as error:
        raise ConfigError(f"posttrain task {name}: {error}") from error
    out = make_output_dir(out_dir, "OUT_DIR")
    paths = []
    for split, size in (("train", train_size), ("eval", eval_size)):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task.sample(size, seed=seed, split=split)))
        paths.append(path)
    tokenizer_dir = out / "tokenizer"
    build_builtin_tokenizer(name).save_pretrained(tokenizer_dir)
    return [*paths, tokenizer_dir]


def registered() -> dict[str, list[str]]:
    """Every registry's names (objectives, rewards, engines, model presets, tasks)."""
    import posttrain.objectives  # noqa: F401  (registers the built-in objectives)

    table = {name: sorted(registry) for name, registry in ALL_REGISTRIES.items()}
    table |= {
        "rewards": sorted(BUILTIN_REWARDS),
        "engines": sorted(ENGINES),
        "presets": list(MODEL_PRESETS),
        "tasks": sorted(TASKS),
    }
    return table


def report(
    run_dirs: Sequence[str | Path], *, output: str | Path | None = None, smoothing: float = 0.6, html: bool = True
) -> tuple[list[Any], Path | None]:
    """The runs as `posttrain report` reads them (`report.RunData`: every logged series, samples, config) and, with
    `html`, the page it writes: `output`/index.html with the PNGs in `output`/plots/ (default: RUN/report for one run,
    ./report for several). The page is None when matplotlib (the `report` extra) is not installed."""
    from posttrain.report import labels_for, load_run

    if not run_dirs:
        raise ConfigError("report: give at least one run directory")
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"report: smoothing={smoothing}; give a weight in [0, 1) (0: none; TensorBoard's 0.6)")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(path, label) for path, label in zip(paths, labels_for(paths))]
    if not html or importlib.util.find_spec("matplotlib") is None:
        return runs, None
    from posttrain.report.page import write_report

    out = Path(output) if output is not None else paths[0] / "report" if len(paths) == 1 else Path("report")
    return runs, write_report(runs, make_output_dir(out, "--output"), smoothing=smoothing)


def compare(
    runs_a: str | Sequence[str | Path], runs_b: str | Sequence[str | Path], *, metric: str, reduce: str = "last",
    higher_is_better: bool = True, n: int = 5, K: int = 5, alpha: float = 0.05, seed: int = 0,
) -> Any:  # fmt: skip
    """Whether runs A beat runs B on `metric`, by AdaStop over their seeds (`posttrain compare`; `report.compare`).
    `runs_a` / `runs_b`: run directories, or one spec string (a directory of runs, a glob, comma-separated parts)."""
    from posttrain.report.compare import compare_runs, expand_runs

    arms = [expand_runs(runs) if isinstance(runs, str) else [Path(p) for p in runs] for runs in (runs_a, runs_b)]
    return compare_runs(*arms, metric=metric, reduce=reduce, higher_is_better=higher_is_better, n=n, K=K,
                        alpha=alpha, seed=seed)  # type: ignore[arg-type]  # fmt: skip


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """Last and best values of a run's logged metrics (`posttrain report`)."""
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a posttrain run directory?)")
    summary: dict[str, Any] = {"steps": max(r["step"] for r in records)}
    for kind in ("train", "eval"):
        rows = [r for r in records if r.get("kind") == kind]
        if rows:
            for key, value in rows[-1].items():
                if key not in ("step", "kind", "time") and isinstance(value, int | float):
                    summary[f"{kind} {key} (last)"] = value
    return summary
