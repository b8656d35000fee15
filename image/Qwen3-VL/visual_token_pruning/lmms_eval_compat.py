# Copied from image/LLaVA/llava/vtr/lmms_eval_compat.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Every lmms-eval workaround the plugins need, in one place, each guarded by a check of the installed version.

Written against lmms-eval 0.7.3 (requirements.txt pins it). Each function says what it works around and
installs itself at most once; `install(folder_name)` runs them all and is called when a fork's plugin is
imported (lmms-eval imports it only when that `--model` is requested; see lmms_eval_base.install_compat).
`check_cli_before_tasks(model_id)` is installed earlier, by each fork's entry point (lmms_eval_entry.py),
which lmms-eval loads when it starts.

- `keep_loglikelihood_tuples`: 0.7.x turns every response into a string before scoring, which breaks
  multiple-choice tasks for every model.
- `name_outputs_after_settings`: results folders are named after `pretrained=` only.
- `write_stats_beside_results`: the efficiency record is written when the results are saved, into the
  results' own folder and stamped with the results' own timestamp (works with `--output_path` and
  with `--config file.yaml`; nothing is read from sys.argv).
- `stable_response_cache_version`: the response cache keys every entry with lmms-eval's "version", which
  is `git describe` run beside the lmms_eval package; with the virtualenv inside a git checkout (ours:
  `.venv/` in this repository) that is OUR commit, so every commit silently emptied the cache. An
  installed (site-packages) lmms-eval is keyed by its release version instead, plus our response format
  (`RESPONSE_FORMAT`), so a cache written when a request type meant something else is not reused.
- `count_response_cache_hits`: requests answered from `--use_cache` never reach the model; the record
  says how many.
- `exit_on_argument_error` / `exit_on_run_error`: the CLI catches every Exception from a run, logs it and
  exits 0; an argument or loading error of our plugin (status 2) and a failure while answering requests
  (status 1) must stop the process with a non-zero status.
- `check_cli_before_tasks`: the CLI indexes every task file (~5 s) before it creates the model, so a bad
  `--model_args` showed only after that; and a task name it cannot find (e.g. with a repeated
  `--include_path`, of which argparse keeps the last) is logged and the process exits 0.
"""

from __future__ import annotations

import os
import sys
import weakref

from loguru import logger

# lmms_eval is imported inside the functions: a fork's entry point imports this module while lmms-eval is
# still importing its evaluator (which loads the entry points), and the plugin may be imported first.

#: Plugin instances alive in this process (the tracker hook writes their records).
LIVE_MODELS: weakref.WeakSet = weakref.WeakSet()


def keep_loglikelihood_tuples() -> bool:
    """Let `(logprob, is_greedy)` pairs (tuples, or lists from the response cache) through the evaluator's
    `unwrap_generation_output` unchanged. Installs only when the installed lmms-eval stringifies them."""
    import lmms_eval.evaluator
    from lmms_eval.api.instance import unwrap_generation_output

    if unwrap_generation_output((0.0, True))[0] != "(0.0, True)":
        return False
    original = lmms_eval.evaluator.unwrap_generation_output
    if getattr(original, "_vtr_keeps_loglikelihood", False):
        return True

    def unwrap(output):
        if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], bool):
            if isinstance(output[0], (int, float)) and not isinstance(output[0], bool):
                return (float(output[0]), output[1]), None
        return original(output)

    unwrap._vtr_keeps_loglikelihood = True
    lmms_eval.evaluator.unwrap_generation_output = unwrap
    return True


def name_outputs_after_settings(folder_name) -> None:
    """Results folder `<pretrained>__vtr-<tag>` for our model_args; `folder_name(model_args, base)` returns
    the name, or None for model_args that are not ours (lmms-eval's name is kept)."""
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

    original = GeneralConfigTracker._get_model_name
    if getattr(original, "_vtr_names_outputs", False):
        return

    def model_name(model_args) -> str:
        base = original(model_args)
        return folder_name(model_args, base) or base

    model_name._vtr_names_outputs = True
    GeneralConfigTracker._get_model_name = staticmethod(model_name)


def write_stats_beside_results() -> None:
    """After lmms-eval saves `<date_id>_results.json`, each live plugin writes its efficiency record
    beside it as `vtr_stats_<tag>_<date_id>[_rankN].json`, with the run's response-cache facts."""
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    original = EvaluationTracker.save_results_aggregated
    if getattr(original, "_vtr_writes_stats", False):
        return

    def save_results_aggregated(self, results, samples, datetime_str):
        original(self, results=results, samples=samples, datetime_str=datetime_str)
        folder = getattr(self, "output_path", None)
        date_id = getattr(self, "date_id", None)
        if not folder or not date_id:
            return
        from pathlib import Path

        folder = Path(folder) / self.general_config_tracker.model_name_sanitized
        cache_root = (results.get("config") or {}).get("use_cache")
        for model in list(LIVE_MODELS):
            model.write_stats(folder, date_id, response_cache=cache_root)

    save_results_aggregated._vtr_writes_stats = True
    EvaluationTracker.save_results_aggregated = save_results_aggregated


#: Appended to the response cache's version: bump it when what the plugin returns for the same request
#: changes meaning (vtr-loss: loglikelihood returns the mean NLL, no longer the summed log-probability), so
#: an old cache folder is not served under the new meaning.
RESPONSE_FORMAT = "vtr-loss"


def stable_response_cache_version() -> bool:
    """Key the response cache by the installed lmms-eval release when lmms_eval lives in site-packages (a git
    hash found there belongs to whatever repository holds the virtualenv), plus `RESPONSE_FORMAT`. Returns
    whether it installed the stable release key (a source checkout of lmms-eval keeps its hash)."""
    import importlib.metadata
    from pathlib import Path

    import lmms_eval.utils

    original = lmms_eval.utils.get_lmms_eval_cache_version
    if getattr(original, "_vtr_stable", False):
        return original._vtr_release
    release = "site-packages" in Path(lmms_eval.__file__).parts

    def cache_version() -> str:
        base = None
        if release:
            try:
                base = importlib.metadata.version("lmms-eval")
            except importlib.metadata.PackageNotFoundError:
                pass
        return f"{base or original()}+{RESPONSE_FORMAT}"

    cache_version._vtr_stable, cache_version._vtr_release = True, release
    lmms_eval.utils.get_lmms_eval_cache_version = cache_version
    return release


def count_response_cache_hits() -> None:
    """Count, per request type, the requests lmms-eval's response cache handed to a plugin instance: those
    it did not compute were answered from the cache (`model.requests_seen`)."""
    try:
        from lmms_eval.caching.response_cache import ResponseCache
    except ImportError:  # a release without the response cache
        return
    original = ResponseCache.execute
    if getattr(original, "_vtr_counts", False):
        return

    def execute(self, lm, reqtype, requests):
        seen = getattr(lm, "requests_seen", None)
        if isinstance(seen, dict):
            seen[reqtype] = seen.get(reqtype, 0) + len(requests)
        return original(self, lm, reqtype, requests)

    execute._vtr_counts = True
    ResponseCache.execute = execute


def under_lmms_eval_cli() -> bool:
    """True when called from inside lmms-eval's `cli_evaluate` (which turns exceptions into exit code 0)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "cli_evaluate" and "lmms_eval" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def exit_on_argument_error(error: Exception, model_name: str):
    """Under the lmms-eval CLI, end the process with status 2 and a one-line reason; elsewhere re-raise."""
    if not under_lmms_eval_cli():
        raise error
    stop(f"{model_name}: invalid --model_args: {error}")


def exit_on_run_error(error: Exception, model_name: str):
    """A failure while answering requests (a missing video, an out-of-memory, a bug): under the lmms-eval
    CLI print the traceback and end the process with status 1 (no partial results pass as a finished run);
    elsewhere re-raise."""
    if not under_lmms_eval_cli():
        raise error
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    message = f"{model_name}: the run failed: {type(error).__name__}: {error}"
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1) from error


#: `--tasks` values that list tasks instead of naming them (lmms-eval's cli_evaluate_single)
LIST_COMMANDS = ("list", "list_groups", "list_tags", "list_subtasks")


def check_cli_before_tasks(model_id: str) -> None:
    """For a CLI run of `model_id` (one of ours): when lmms-eval's `cli_evaluate_single` creates its
    TaskManager, first check `--model_args` with the plugin's own parser (an error exits 2 at once, as the
    plugin would after the task index), that every `--include_path` folder exists and that --tasks is given;
    after the index, exit 2 naming any `--tasks` name it does not hold (lmms-eval would log it and exit 0).
    Each fork's entry point calls this; one wrapper serves every fork's model id. Outside the CLI (a
    TaskManager made elsewhere, or another --model) nothing changes."""
    try:
        from lmms_eval.tasks import TaskManager
    except ImportError:  # another layout, or mid-import: the plugin still checks when it is created
        return
    init = TaskManager.__init__
    if not hasattr(init, "_vtr_models"):
        original = init

        def init(self, *args, **kwargs):
            cli = cli_args(sys._getframe(1))
            ours = cli is not None and cli.model in init._vtr_models
            if ours:
                check_model_args(cli)
                check_include_path(cli.include_path, cli.model)
                if cli.tasks is None:  # lmms-eval: an error message, then exit 0
                    stop(f"{cli.model}: no --tasks given")
            original(self, *args, **kwargs)
            if ours:
                check_tasks(self, cli)

        init._vtr_models = set()
        TaskManager.__init__ = init
    init._vtr_models.add(model_id)


def cli_args(frame):
    """The parsed arguments of the run when `frame` is lmms-eval's `cli_evaluate_single`, else None."""
    code = frame.f_code
    if code.co_name != "cli_evaluate_single" or "lmms_eval" not in code.co_filename:
        return None
    args = frame.f_locals.get("args")
    needed = ("model", "model_args", "tasks", "include_path", "batch_size", "max_batch_size", "device")
    return args if all(hasattr(args, key) for key in needed) else None


def check_model_args(cli) -> None:
    from lmms_eval import models

    if not isinstance(cli.model_args, str):
        return
    try:
        validate = models.get_model(cli.model, getattr(cli, "force_simple", False)).validate_model_args
    except Exception:  # an install that cannot import the plugin: lmms-eval says so when it creates the model
        return
    extra = {"batch_size": cli.batch_size, "max_batch_size": cli.max_batch_size, "device": cli.device}
    try:
        validate(cli.model_args, extra)
    except ValueError as error:
        stop(f"{cli.model}: invalid --model_args: {error}")


def check_include_path(include_path, model_name: str) -> None:
    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in paths:
        if not os.path.isdir(path):
            stop(f"{model_name}: --include_path {path}: no such folder")


def check_tasks(manager, cli) -> None:
    """lmms-eval's own test (cli_evaluate_single), which only logs: a name that is neither a task, group or
    tag of the index, nor a YAML file, nor a pattern."""
    tasks = cli.tasks
    if not isinstance(tasks, str) or tasks in LIST_COMMANDS or os.path.isdir(tasks):
        return
    names = tasks.split(",")
    found = manager.match_tasks(names)
    missing = [name for name in names if name not in found and "*" not in name and not os.path.isfile(name)]
    if not missing:
        return
    message = f"{cli.model}: --tasks not found: {', '.join(missing)} (searched lmms-eval's tasks"
    message += f" and --include_path {cli.include_path})" if cli.include_path else ")"
    repeated = sum(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv)
    if repeated > 1:
        message += (
            f"; --include_path was given {repeated} times and lmms-eval keeps only the last: pass one folder"
            " that holds every task folder (it is searched recursively)"
        )
    stop(message)


def stop(message: str, status: int = 2):
    """End the process with `status` and a one-line message (log and stderr)."""
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(status)


def install(folder_name) -> None:
    keep_loglikelihood_tuples()
    name_outputs_after_settings(folder_name)
    write_stats_beside_results()
    stable_response_cache_version()
    count_response_cache_hits()
