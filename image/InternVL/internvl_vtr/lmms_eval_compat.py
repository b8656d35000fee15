# Copied from image/LLaVA/llava/vtr/lmms_eval_compat.py
# Shared vtr file: edit it in image/LLaVA/llava/vtr, then `make fix-copies` updates every fork.
"""Every lmms-eval workaround the plugins need, in one place, each guarded by a check of the installed version.

Written against lmms-eval 0.7.3 (requirements.txt pins it). Each function says what it works around and
installs itself at most once; `install(folder_name)` runs them all and is called when a fork's plugin is
imported (lmms-eval imports it only when that `--model` is requested; see lmms_eval_base.install_compat).

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
"""

from __future__ import annotations

import sys
import weakref

import lmms_eval.evaluator
from lmms_eval.api.instance import unwrap_generation_output
from loguru import logger

#: Plugin instances alive in this process (the tracker hook writes their records).
LIVE_MODELS: weakref.WeakSet = weakref.WeakSet()


def keep_loglikelihood_tuples() -> bool:
    """Let `(logprob, is_greedy)` pairs (tuples, or lists from the response cache) through the evaluator's
    `unwrap_generation_output` unchanged. Installs only when the installed lmms-eval stringifies them."""
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
    message = f"{model_name}: invalid --model_args: {error}"
    logger.error(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2) from error


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


def install(folder_name) -> None:
    keep_loglikelihood_tuples()
    name_outputs_after_settings(folder_name)
    write_stats_beside_results()
    stable_response_cache_version()
    count_response_cache_hits()
