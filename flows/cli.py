"""score-images: score images with a DeiT model into Parquet, via Prefect and Ray.

Exit codes: 0 the run committed (some images may have failed: see the errors
table); 1 the run failed; 2 a bad argument, model or input (nothing ran);
3 more images failed than --max-failed / --max-failed-fraction allow; 130
interrupted (Ctrl-C or SIGTERM; the run resumes with its --run-id).
Options are generated from :class:`tasks.settings.ScoreSettings`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import typing

from pydantic import ValidationError

from tasks.settings import ScoreSettings, format_validation_error, name_fields

if typing.TYPE_CHECKING:
    from deit_model import CheckpointRef

from . import LIBRARY_LOGGERS
from .options import add_settings_options, flag, json_object

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TOO_MANY_ERRORS = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

# Prefect reads its settings at import time, so these are set before it is imported.
_PREFECT_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(LIBRARY_LOGGERS),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # library logs from before the flow run begins (Ray starting early) stay local, without a warning
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line, exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; reported as one line (how to resume), exit 130."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Never break lines inside hub ids such as facebook/deit-base-distilled-patch16-224."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``score-images`` argument parser."""
    parser = _Parser(prog="score-images", description=__doc__.split("\n\n")[0],
                     formatter_class=_HelpFormatter,
                     epilog="Exit codes: 0 committed, 1 run failed, 2 bad argument/model/input, "
                            "3 too many images failed, 130 interrupted (resume with --run-id).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", formatter_class=_HelpFormatter, help="score images under --input and write Parquet to --output",
                         description="Run the score-images flow in this process (ephemeral Prefect "
                                     "unless PREFECT_API_URL is set).")
    add_settings_options(run)
    demo = sub.add_parser("demo", help="score generated sample images offline (see README)",
                          description="Generate sample images and score them with the default model, "
                                      "or with a random-weight copy of it when the hub is unreachable.")
    demo.add_argument("--output", default="demo-output", help="where to write (default: demo-output)")
    demo.add_argument("--num-images", type=_positive_int, default=24, help="sample images to generate (default: 24)")
    runs = sub.add_parser("runs", help="list the runs under --output, or show one run's manifest",
                          description="List runs (newest last) with their status and counts, or print one "
                                      "run's manifest as JSON with --run-id.")
    runs.add_argument("--output", required=True, help="the output the runs wrote to")
    runs.add_argument("--run-id", help="print this run's manifest")
    runs.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                      help="fsspec options for the output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``score-images`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in LIBRARY_LOGGERS:  # explicit, so Prefect's logging setup cannot quieten them
        logging.getLogger(name).setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    params = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(**params)
        if args.command == "runs":
            return show_runs(**params)
        return run_flow(params)
    except UsageError as exc:
        print(f"score-images: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"score-images: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before a run started (checks, start-up): nothing to resume
        print("score-images: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def check_settings(params: dict) -> tuple[ScoreSettings, CheckpointRef]:
    """(settings, resolved checkpoint), validated before anything starts; UsageError if bad.

    Only cheap checks (no torch import): the model's files, its config and
    preprocessing config, and one listing call. The driver never imports the
    model libraries; the actors do, while Prefect starts.
    """
    from deit_model import ModelLoadError, check_preprocessing, resolve_checkpoint
    from tasks.enumerate import list_images
    from tasks.storage import filesystem

    try:
        settings = ScoreSettings(**params)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, name=flag, whole="options")) from None
    try:
        ref = resolve_checkpoint(settings.model, settings.revision, settings.storage_options)
        check_preprocessing(ref.local_dir)  # inspects the config (architecture) first
    except ModelLoadError as exc:
        # a store's missing credentials: what to set, as for --input and --output
        with storage_checked(settings.model):
            if exc.__cause__ is not None and type(exc.__cause__).__name__ in _CREDENTIAL_ERRORS:
                raise exc.__cause__ from None
        raise UsageError(str(exc)) from None
    with storage_checked(settings.input):
        next(iter(list_images(settings.input, settings.storage_options)), None)
    with storage_checked(settings.output):  # scheme, driver and credentials, before Ray and Prefect start
        fs, path = filesystem(settings.output, settings.storage_options)
        if fs.exists(path) and fs.isfile(path):  # exists() first: isfile() hides a driver's errors
            raise UsageError(f"output {settings.output} is a file; --output names a folder or prefix for the dataset")
    return settings, ref


_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError"}


@contextlib.contextmanager
def storage_checked(uri: str):
    """Turn what a storage call on ``uri`` raises (any driver's exceptions) into a one-line UsageError."""
    from tasks.storage import first_line, is_backend_error, translate_error

    try:
        yield
    except Exception as exc:
        if not is_backend_error(exc):
            raise
        message = first_line(translate_error(exc, uri))
        raise UsageError(message if uri in message else f"{uri}: {message}") from None


def run_flow(params: dict) -> int:
    """Check ``params``, run the flow, print the summary; return the exit code.

    SIGTERM and SIGHUP end it as Ctrl-C does (exit 130) from its first line, not only while the
    flow runs: a scheduler may stop it while the model downloads (found in review).
    """
    with _terminate_as_interrupt():
        return _run_flow(params)


def _run_flow(params: dict) -> int:
    settings, ref = check_settings(params)
    from tasks.plan import RunRefused, new_run_id
    from tasks.pipeline import start_actors_early
    from tasks.ray_cluster import start_early

    from .prefect_early import start_temporary_server

    # Ray, then the scoring actors (which import torch and load the weights), and
    # Prefect's server boot in other processes while this one starts the flow
    start_early(settings.resolved_ray_address(), then=lambda: start_actors_early(settings, ref))
    wait_for_prefect = start_temporary_server()
    from tasks.pipeline import ErrorThresholdExceeded
    from tasks.report import format_summary

    from .score_images import score_images

    # the id is chosen here, so that every way the run can end names it; local paths are the
    # command's own folder's, and the flow takes only absolute ones
    settings = settings.model_copy(update={"run_id": settings.run_id or new_run_id(), **{
        name: os.path.abspath(os.path.expanduser(getattr(settings, name))) for name in ("input", "output")
        if "://" not in getattr(settings, name)}})
    resume = f"rerun with --run-id {settings.run_id} (and the same options) to resume"
    interrupted = f"run {settings.run_id} interrupted; {resume}"
    try:
        with _terminate_as_interrupt():
            wait_for_prefect()
            state = score_images(**settings.model_dump(), return_state=True)
    except KeyboardInterrupt:
        raise Interrupted(interrupted) from None
    finally:
        _stop_early_work(interrupted)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        # too many failures, or a refusal (a resume with other options, a changed checkpoint, an
        # unknown --only-failed run), says what to do instead, in the options' spelling; anything
        # else may pass on a resume
        if isinstance(error, (ErrorThresholdExceeded, RunRefused)):
            print(f"score-images: run {settings.run_id} failed: {name_fields(str(error), flag)}", file=sys.stderr)
            return EXIT_TOO_MANY_ERRORS if isinstance(error, ErrorThresholdExceeded) else EXIT_FAILED
        first_line = (state.message or "unknown error").strip().splitlines()[0]
        print(f"score-images: run {settings.run_id} failed: {first_line} (details in the log above; {resume})",
              file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(state.result()))
    return EXIT_OK


def _stop_early_work(interrupted: str) -> None:
    """Stop what the command started early; Ctrl-C meanwhile still ends with ``interrupted``.

    Why: a second Ctrl-C while Ray shut down replaced the line that says how to resume with a
    bare "interrupted" (found in review); the run's id is known only here.
    """
    from tasks.early_pool import discard_early
    from tasks.ray_cluster import stop_early

    try:
        discard_early()  # only if the run never reached scoring
        stop_early()
    except KeyboardInterrupt:
        raise Interrupted(interrupted) from None


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler or `kill`) and SIGHUP (the terminal closed) end the run as Ctrl-C does.

    Why SIGHUP too: Python's default for it exits without atexit hooks, and Prefect's
    temporary server, in its own session (prefect_early), is stopped by one.
    """
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def show_runs(output: str, run_id: str | None = None, storage_options: dict | None = None) -> int:
    """Print the runs under ``output`` (or one manifest); exit 2 if there is none."""
    from tasks import storage
    from tasks.report import list_runs, manifest_record, read_manifest

    if run_id:
        with storage_checked(output):
            summary = read_manifest(output, run_id, storage_options)
        if summary is None:
            raise UsageError(f"no run {run_id!r} under {output}; 'score-images runs --output {output}' lists them")
        print(json.dumps(manifest_record(summary), indent=2, default=str))
        return EXIT_OK
    with storage_checked(output):
        fs, root = storage.filesystem(output, storage_options)
        if fs.exists(root) and fs.isfile(root):
            raise UsageError(f"output {output} is a file; pass the --output of a run (a folder or prefix)")
        runs = list_runs(output, storage_options)
        if not runs and not fs.exists(root):
            raise UsageError(f"no output at {output}; pass the --output of a run")
    print(f"{'run_id':<28} {'status':<11} {'started_at':<26} {'listed':>8} {'scored':>8} {'failed':>7}  model")
    for r in runs:
        print(f"{r.run_id:<28} {r.status:<11} {r.started_at:<26} {r.listed:>8} {r.scored:>8} {r.failed:>7}  {r.model}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
