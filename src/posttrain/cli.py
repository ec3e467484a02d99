"""The `posttrain` command line. It parses and dispatches only; every command is a Python function too.

posttrain sft RECIPE [key.sub=value ...] [--resume]
posttrain rl RECIPE [key.sub=value ...] [--resume]
posttrain pref RECIPE [key.sub=value ...] [--resume]
posttrain rm RECIPE [key.sub=value ...] [--resume]
posttrain eval [RECIPE] [key.sub=value ...]
posttrain generate MODEL_DIR --prompt TEXT [--n N]
posttrain serve MODEL_DIR [--port 8000] [--parser hermes] [--record calls.jsonl]
posttrain export RUN_DIR [--merge] [--checkpoint STEP] [--output DIR]
posttrain demo
posttrain task arithmetic|reverse|sort|count|sequence OUT_DIR
posttrain list [advantages|policy_losses|aggregations|kl_estimators|preference_losses|rewards|presets]
posttrain report RUN_DIR [RUN_DIR ...] [--output DIR] [--smoothing W] [--no-html]
posttrain compare RUNS_A RUNS_B --metric M [--reduce last] [--lower-is-better] [--n 5] [--k 5] [--alpha 0.05]

Exit codes: 0 done; 2 a user error (one line on stderr, the traceback with --debug); 130 / 143 stopped by
SIGINT / SIGTERM (a training command first finishes its step and writes a checkpoint, and prints the
command that resumes it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from posttrain import __version__
from posttrain.runtime.signals import TrainingInterrupted

USER_ERROR_NAMES = (
    "ConfigError",
    "CudaGraphsChoiceError",
    "DataError",
    "KernelChoiceError",
    "ModelLoadError",
    "RewardLoadError",
    "SamplingParamsError",
    "RewardFailureError",
    "UnknownObjectiveError",
    "CheckpointError",
    "PosttrainError",
    "TrainingStopped",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        return launch_ranks(args.nproc, list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.handler(args) or 0)
    except TrainingInterrupted as stop:
        resumable = hasattr(args, "recipe")  # `posttrain demo` starts again instead
        print(f"{stop}\nresume with: {_resume_command(args)}" if resumable else str(stop), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training of generative models with feedback.")
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_recipe_command(sub, "sft", "supervised fine-tuning", "SFTConfig", _run_sft, resume=True)
    _add_recipe_command(
        sub, "pref", "preference optimisation: offline, or in rounds on own samples (online:)", "PrefConfig", _run_pref,
        resume=True,
    )
    _add_recipe_command(sub, "rm", "reward model (Bradley-Terry, listwise)", "RMConfig", _run_rm, resume=True)
    _add_recipe_command(sub, "rl", "online RL (PPO / GRPO family)", "RLConfig", _run_rl, resume=True)
    _add_recipe_command(
        sub, "eval", "greedy accuracy and pass@k on held-out prompts with answers", "EvalConfig", _run_eval
    )

    gen = _add(sub, "generate", "sample completions for prompts", _run_generate)
    gen.add_argument("model_dir", help="a local Hugging Face model directory")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--seed", type=int, default=0)

    srv = _add(sub, "serve", "serve a model as an OpenAI-compatible chat-completions endpoint on 127.0.0.1, every "
                             "call recorded as token ids and log-probs", _run_serve)  # fmt: skip
    srv.add_argument("model_dir", help="a local Hugging Face model directory with its tokenizer (a chat template)")
    srv.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (0: a free one)")
    srv.add_argument("--parser", default="hermes", help="the tool-call parser: hermes, llama3_json, mistral, ...")
    srv.add_argument("--max-new-tokens", type=int, default=256, help="most tokens a call generates")
    srv.add_argument("--temperature", type=float, default=1.0, help="when a request gives none; 0 for greedy")
    srv.add_argument("--engine", default="native")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--record", help="append every call to this JSONL file (prompt/completion ids, log-probs)")

    demo = _add(sub, "demo", "tiny model, SFT then GRPO on arithmetic, evaluated (CPU, minutes)", _run_demo)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)

    task = _add(sub, "task", "write a built-in task's train/eval JSONL and its tokenizer", _run_task)
    task.add_argument("name", choices=["arithmetic", "reverse", "sort", "count", "sequence"])
    task.add_argument("out_dir")
    task.add_argument("--digits", type=int, default=None, help="arithmetic: digits per operand (default 2)")
    task.add_argument("--operators", default=None, help="arithmetic: operators, any of +-* (default +-)")
    task.add_argument("--train-size", type=int, default=20000)
    task.add_argument("--eval-size", type=int, default=500)
    task.add_argument(
        "--think-fraction", type=float, default=None,
        help="arithmetic: share of rows worked out in <think> first (+ and - only; default 0)",
    )
    task.add_argument("--wrong-fraction", type=float, default=0.0,
                      help="share of demonstrations that state a near miss instead of the answer (noisy)")  # fmt: skip
    task.add_argument("--seed", type=int, default=0)

    export = _add(sub, "export", "write a run's model as a standalone directory (--merge: a LoRA adapter merged)",
                  _run_export)  # fmt: skip
    export.add_argument("run_dir", help="a posttrain run directory")
    export.add_argument("--merge", action="store_true", help="merge a LoRA run's adapter into its base model")
    export.add_argument("--checkpoint", help="a checkpoint's step (100) or name (step-00000100) instead of final/")
    export.add_argument("--output", help="where to write it (default: RUN/merged, or RUN/exported)")

    lst = _add(sub, "list", "list registered objectives, rewards and model presets", _run_list)
    lst.add_argument("what", nargs="?", default="all")

    about = "every metric of one or more runs: sparklines here, an HTML page with plots"
    report = _add(sub, "report", about, _run_report)
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="posttrain run directories (several: overlaid)")
    report.add_argument("--output", help="where the page and plots go (default: RUN/report for one run, ./report)")
    report.add_argument("--smoothing", type=float, default=0.6, help="EMA weight of smoothed curves")
    report.add_argument("--no-html", action="store_true", help="the terminal summary only")

    about = "does A beat B on a metric, over seeds? AdaStop's sequential test (arXiv:2306.10882)"
    cmp = _add(sub, "compare", about, _run_compare)
    for arm in ("A", "B"):
        cmp.add_argument(f"runs_{arm.lower()}", metavar=f"RUNS_{arm}",
                         help="a directory of runs, a run, a quoted glob, or comma-separated ones")  # fmt: skip
    cmp.add_argument("--metric", required=True, help="a logged metric (eval_accuracy, rewards/total/mean, ...)")
    cmp.add_argument("--reduce", default="last", choices=["last", "mean", "max", "min"], help="a run's value")
    cmp.add_argument("--lower-is-better", action="store_true", help="lower values win (default: higher, or lower for "
                     "a metric named *loss*)")  # fmt: skip
    cmp.add_argument("--n", type=int, default=5, help="seeds per arm in each interim")
    cmp.add_argument("--k", type=int, default=5, help="most interims (then an undecided comparison is equal)")
    cmp.add_argument("--alpha", type=float, default=0.05, help="family-wise error over every interim")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the permutations AdaStop samples")
    return parser


def _add(sub: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(handler=handler)
    return p


def _add_recipe_command(
    sub: Any,
    name: str,
    help_text: str,
    config_name: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    resume: bool = False,
) -> None:
    p = _add(sub, name, help_text, handler)
    p.epilog = _options_epilog(config_name, name)
    p.add_argument("recipe", nargs="?", help="a YAML recipe (optional: everything can be given as key=value)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a recipe value")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
        p.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train data-parallel on N processes of this machine (launches torchrun; see "
                            "docs/distributed.md)")  # fmt: skip
    p.set_defaults(config_name=config_name)


def _options_epilog(config_name: str, command: str) -> str:
    """Every option of the command's config with its default and its whole description, wrapped to the terminal."""
    import posttrain.config as config

    rows = list(_option_rows(getattr(config, config_name)))
    width = max(len(k) for k, _, _ in rows)
    columns = max(shutil.get_terminal_size((100, 24)).columns - 1, 40)
    lines = [f"options (key=value; default, meaning) for `posttrain {command}`:"]
    for key, default, description in rows:
        head = f"  {key:<{width}}  {default:>10}  "
        indent = len(head) if columns - len(head) >= 30 else 6
        if indent != len(head):  # a narrow terminal: the description goes under the key
            lines.append(head.rstrip())
            head = " " * indent
        wrap = dict(initial_indent=head, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False)
        lines.append(textwrap.fill(description, columns, **wrap) if description else head.rstrip())
    return "\n".join(lines)


def _option_rows(model: Any, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, default, description) of every option, the description followed by the allowed values of a Literal
    field or the names registered for a name field; an optional section's keys (null by default, e.g. `online`)
    follow its own row, and a list of mappings' keys (`rewards[].fn`) the list's."""
    import posttrain.config as config

    for key, default, description in config.describe_options(model, prefix=prefix):
        annotation = _annotation_of(model, key.removeprefix(prefix))
        yield key, default, description + _allowed_values(annotation, description)
        section = _section_of(annotation)
        if section is not None and default == "null":
            yield from _option_rows(section, prefix=f"{key}.")
        entry = _section_of(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is list else None
        if entry is not None:  # a list of mappings, e.g. `rewards`: the keys of one entry
            yield from _option_rows(entry, prefix=f"{key}[].")


def _annotation_of(model: Any, key: str) -> Any:
    """The type annotation of a dotted config key (through nested and optional sections)."""
    annotation: Any = model
    for part in key.split("."):
        annotation = _section_of(annotation).model_fields[part].annotation
    return annotation


def _section_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (`Section`, `Section | None`), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((m for m in map(_section_of, typing.get_args(annotation)) if m is not None), None)
    return None


def _allowed_values(annotation: Any, description: str) -> str:
    """' Allowed: a, b.' for a Literal field (null too when it is optional), ' Registered: ...' for a name field
    whose description points to `posttrain list X`, else ''."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    literals = []
    for option in options:
        if typing.get_origin(option) is typing.Annotated:
            option = typing.get_args(option)[0]
        if typing.get_origin(option) is typing.Literal:
            literals += [str(value) for value in typing.get_args(option)]
    if literals:
        return f" Allowed: {', '.join(literals + (['null'] if type(None) in options else []))}."
    listed = re.search(r"`posttrain list (\w+)`", description)
    if listed and str in options:
        from posttrain.api import registered

        names = registered().get(listed.group(1))
        if names:
            return f" Registered: {', '.join(names)}."
    return ""


def launch_ranks(nproc: int, argv: list[str]) -> int:
    """`posttrain CMD ... --nproc N`: the same command on N processes of this machine through torchrun, each
    process's torch threads a share of the cores (unless OMP_NUM_THREADS says otherwise)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "posttrain", *rest]  # fmt: skip
    return subprocess.run(command, env=env).returncode


def _split_recipe(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The first positional is a recipe unless it looks like an override."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def _resume_command(args: argparse.Namespace) -> str:
    recipe = [args.recipe] if args.recipe else []
    return shlex.join(["posttrain", args.command, *recipe, *args.overrides, "--resume"])


def _load(args: argparse.Namespace) -> Any:
    import posttrain.config as config

    recipe, overrides = _split_recipe(args)
    return config.load_config(getattr(config, args.config_name), recipe, overrides)


def _train_with(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command handler that loads the recipe and runs `posttrain.trainers.<module>.<function>` on it.
    The trainer is imported when the command runs, so `posttrain --help` stays fast."""

    def run(args: argparse.Namespace) -> int:
        train = getattr(importlib.import_module(f"posttrain.trainers.{module}"), function)
        result = train(_load(args), resume=args.resume)
        if os.environ.get("RANK", "0") == "0":  # one line for a run on several ranks
            print(f"final model: {result.final_dir}")
        return 0

    return run


_run_sft = _train_with("sft", "train_sft")
_run_rl = _train_with("rl", "train_rl")
_run_pref = _train_with("preference", "train_pref")
_run_rm = _train_with("reward_model", "train_rm")


def _run_eval(args: argparse.Namespace) -> int:
    from posttrain.trainers.evaluation import run_evaluation

    cfg = _load(args)
    result = run_evaluation(cfg)
    _print_table("evaluation", result.metrics(), extra={"prompts": result.num_prompts})
    print(f"written: {Path(cfg.output_dir) / 'eval.json'}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from posttrain.api import generate

    completions = generate(
        args.model_dir,
        args.prompt,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        seed=args.seed,
    )
    for prompt, outs in zip(args.prompt, completions):
        for out in outs:
            print(json.dumps({"prompt": prompt, "completion": out}))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from posttrain.agents import serve

    endpoint = serve(args.model_dir, port=args.port, parser=args.parser, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, engine=args.engine, seed=args.seed, record=args.record)  # fmt: skip
    print(f"serving {args.model_dir} at {endpoint.base_url} (POST /chat/completions, GET /models); Ctrl-C stops",
          flush=True)  # fmt: skip
    try:
        endpoint.wait()
    finally:
        endpoint.close()
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from posttrain.demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed)
    return 0


def _run_task(args: argparse.Namespace) -> int:
    from posttrain.api import write_task

    paths = write_task(
        args.name,
        args.out_dir,
        digits=args.digits,
        operators=args.operators,
        train_size=args.train_size,
        eval_size=args.eval_size,
        think_fraction=args.think_fraction,
        wrong_fraction=args.wrong_fraction,
        seed=args.seed,
    )
    for path in paths:
        print(path)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from posttrain.api import export

    print(export(args.run_dir, merge=args.merge, checkpoint=args.checkpoint, output=args.output))
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from posttrain.api import registered

    table = registered()
    if args.what != "all" and args.what not in table:
        raise _config_error(f"list: '{args.what}' is not a list; lists: {', '.join(table)}")
    for name, entries in table.items():
        if args.what in ("all", name):
            print(f"{name}: {', '.join(entries) or '(none)'}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from posttrain.api import report
    from posttrain.report.terminal import run_table

    runs, page = report(args.run_dirs, output=args.output, smoothing=args.smoothing, html=not args.no_html)
    console = Console(width=max(shutil.get_terminal_size((140, 24)).columns, 100))
    for run in runs:
        console.print(run_table(run))
    if page is not None:
        print(f"report: {page} (plots in {page.parent / 'plots'})")
    elif not args.no_html:
        print("report: the HTML page and plots need matplotlib: pip install 'posttrain[report]'", file=sys.stderr)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from posttrain.api import compare

    lower = args.lower_is_better or "loss" in args.metric
    result = compare(args.runs_a, args.runs_b, metric=args.metric, reduce=args.reduce, higher_is_better=not lower,
                     n=args.n, K=args.k, alpha=args.alpha, seed=args.seed)  # fmt: skip
    print(f"A = {args.runs_a}, B = {args.runs_b}")
    print(result.summary())
    return 0


def _print_table(title: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in {**(extra or {}), **metrics}.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _config_error(message: str) -> Exception:
    from posttrain.config import ConfigError

    return ConfigError(message)


def _is_user_error(error: BaseException) -> bool:
    return any(cls.__name__ in USER_ERROR_NAMES for cls in type(error).__mro__) or isinstance(error, FileNotFoundError)


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
