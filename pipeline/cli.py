"""`distill` command line: thin wrappers over the stages. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
import zoneinfo

from pipeline import registry, storage, submit
from pipeline.errors import ParityError, UserError, WeakTeacher
from pipeline.console import quiet_console
from pipeline.history_page import write_history_page
from pipeline.report import render_table, write_report
from pipeline.schedule import data_date
from pipeline.spec import load_spec
from pipeline.stages.click_logs import generate

EXIT_USER_ERROR = 2
EXIT_WEAK_TEACHER = 1
EXIT_PARITY = 1  # an export that does not compute what was evaluated: a fault of the artifact, not of the spec


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args) or 0
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except WeakTeacher as exc:  # a verdict, not a mistake: the run stopped before labelling
        if args.debug:
            raise
        print(f"error: teacher gate: {exc}", file=sys.stderr)
        return EXIT_WEAK_TEACHER
    except ParityError as exc:
        if args.debug:
            raise
        print(f"error: export parity: {exc}", file=sys.stderr)
        return EXIT_PARITY
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil a CTR teacher into a small student on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str, with_spec: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        if with_spec:
            sub.add_argument("spec", help="job spec YAML (see jobs/)")
            sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a spec field, e.g. --set train.epochs=1 (repeatable)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    run = command("run", _run, "run the job end to end: data, teacher, soft labels, students, report")
    run.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars (by default "
                     "they go to <run_dir>/logs/stderr.log)")
    validate = command("validate", _validate, "check a job spec; exit 0 if valid, 2 with the problems otherwise")
    validate.add_argument("--data", action="store_true", help="also check the click logs: every day's files, "
                          "their schemas and their first rows, every problem at once")
    inspect = command("inspect", _inspect, "summarise a click log (partitions, rows, per-column types, nulls, "
                      "distinct counts) and propose a features: section", with_spec=False)
    inspect.add_argument("target", metavar="PATH_OR_SPEC", help="a log file or folder (local or s3://), or a job spec")
    inspect.add_argument("--rows", type=int, default=100_000, help="rows sampled for the column profiles")
    inspect.add_argument("--format", choices=["parquet", "csv"], help="default: from the files' suffixes")
    inspect.add_argument("--partition-key", help="the day folders' key (default: date, dt, ds, day or pt)")
    inspect.add_argument("--time-column", help="a flat log's event-time column, to derive its days")
    inspect.add_argument("--timezone", default="UTC", help="the zone whose midnight starts a day")
    inspect.add_argument("--delimiter", help="CSV field separator (default: ',', or a tab for .tsv)")
    command("generate", _generate, "write the spec's synthetic click log (data.source: synthetic)")
    report = command("report", _report, "rebuild report.md and report.html from a finished run's metrics.json", with_spec=False)
    report.add_argument("run_dir", help="a run directory holding metrics.json")
    _serving_commands(command)
    _cluster_commands(command)
    _nightly_commands(command)
    return parser


def _serving_commands(command) -> None:
    """`export` and `score`: the serving artifact of a finished run (pipeline/export.py, pipeline/serving.py)."""
    export = command("export", _export, "export a finished run's model (default: the recommended student) to "
                     "ONNX or TorchScript, checked for parity with the evaluated model", with_spec=False)
    export.add_argument("run_dir", help="a finished run's directory (it holds spec.json and metrics.json)")
    export.add_argument("--model", help="the model to export, e.g. teacher or student_hard (default: the "
                        "recommended student)")
    export.add_argument("--format", choices=["onnx", "torchscript"], help="default: every format of export.formats")
    score = command("score", _score, "score a Parquet or CSV log with an exported ONNX model (ONNX Runtime and "
                    "signature.json only; no torch)", with_spec=False)
    score.add_argument("model_dir", help="an export directory: model.onnx and signature.json")
    score.add_argument("log", help="a Parquet or CSV file, or a folder of them (local or s3://)")
    score.add_argument("--out", required=True, help="the Parquet file to write: the log's rows plus logit "
                       "(and probability for a binary model)")
    score.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    score.add_argument("--delimiter", help="CSV field separator (default: ',', or a tab for .tsv)")


def _nightly_commands(command) -> None:
    """`nightly`, `schedule`, `registry`: incremental re-distillation (pipeline/nightly.py, registry.py)."""
    nightly = command("nightly", _nightly, "run one nightly cycle: evaluate on --date, train on the days before it")
    nightly.add_argument("--date", type=_date,
                         help="the day to evaluate on, YYYY-MM-DD (default: yesterday in schedule.timezone)")
    nightly.add_argument("--address", help="submit the cycle to this Ray cluster and wait, instead of running it here")
    nightly.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars (by default "
                         "they go to <run_dir>/nightly/logs/stderr.log)")
    schedule = command("schedule", _schedule, "stay running and fire nightly cycles on the spec's cron")
    schedule.add_argument("--dry-run", action="store_true", help="list what would run between --from and --to")
    schedule.add_argument("--from", dest="start", type=_date, help="first day of the dry run (YYYY-MM-DD)")
    schedule.add_argument("--to", dest="end", type=_date, help="last day of the dry run (YYYY-MM-DD)")
    schedule.add_argument("--address", help="submit each cycle to this Ray cluster instead of running it here")
    registry = command("registry", _registry, "list, show, promote or roll back versions in the model registry")
    registry.add_argument("action", choices=["list", "show", "promote", "rollback"],
                          help="show prints the version's MODEL_CARD.md")
    registry.add_argument("version", nargs="?", help="the version id (show, promote)")
    command("history", _history, "write the nightly history page (<run>/nightly/index.html): metrics, decisions, "
            "rows relabelled and ECE per night")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; expected YYYY-MM-DD") from None


def _cluster_commands(command) -> None:
    """`submit`, `status`, `logs`, `stop`, `jobs`: the Ray Jobs API of a running cluster (pipeline/submit.py)."""
    submit = command("submit", _submit, "run the job on a Ray cluster through the Ray Jobs API; prints the job id")
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs; exit 0 if it succeeded, 1 with its error otherwise")
    submit.add_argument("--max-upload-mb", type=float, metavar="MB", help="refuse to upload a working_dir larger "
                        "than this (default: Ray's own limit, 512 MiB)")
    status = command("status", _status, "a cluster job's status and message", with_spec=False)
    logs = command("logs", _logs, "a cluster job's logs", with_spec=False)
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing until the job ends; exit 0 if it succeeded, 1 otherwise")
    stop = command("stop", _stop, "stop a cluster job", with_spec=False)
    jobs = command("jobs", _jobs, "list the cluster's jobs", with_spec=False)
    for sub in (status, logs, stop):
        sub.add_argument("job_id", help="the id `distill submit` printed (a submission id)")
    for sub in (submit, status, logs, stop, jobs):
        sub.add_argument("--address", help="the cluster's dashboard URL, e.g. http://HOST:8265 "
                         "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, http://127.0.0.1:8265)")
        sub.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                         help="how long to wait for the cluster to answer (default 10)")


def _load(args):
    return load_spec(args.spec, args.overrides)


def _run(args) -> int:
    # Lazy: pipeline.job imports the stages, hence torch (seconds), which the other commands never need.
    from pipeline.job import run_job

    spec = _load(args)
    with quiet_console(spec.run_dir, verbose=args.verbose):
        metrics = run_job(spec)
    print(f"\n{render_table(metrics['models'], metrics['eval']['ceiling_auc'], metrics['task'])}\n")
    print(f"run directory: {spec.run_dir} (metrics.json, report.md); {metrics['wall_seconds']:.0f}s in all")
    return 0


def _validate(args) -> int:
    spec = _load(args)
    if args.data:
        from pipeline.stages.click_logs import check_data, ensure_click_logs

        ensure_click_logs(spec)  # a synthetic log is written first, as `run` would
        check_data(spec)
        print(f"{args.spec}: the click logs of every selected day pass the checks")
    print(f"{args.spec}: valid job spec {spec.name!r} (run directory {spec.run_dir})")
    return 0


def _inspect(args) -> int:
    from pipeline.data.inspect import source_for_path, summarise, with_time_column
    from pipeline.data.inspect_text import render
    from pipeline.data.propose import propose
    from pipeline.data.sources import LogSource

    if args.rows < 1:
        raise UserError(f"--rows must be at least 1, got {args.rows}")
    if args.target.endswith((".yaml", ".yml")):
        source = LogSource.from_spec(load_spec(args.target))
    else:
        source = source_for_path(args.target, args.format, args.partition_key, args.time_column, args.timezone,
                                 args.delimiter)
    summary = summarise(source, args.rows)
    proposal = propose(summary)
    if summary.days is None and proposal.time_column:  # a flat log with an event time: show its days
        summary = with_time_column(summary, proposal.time_column, args.timezone)
    print(render(args.target, summary, proposal), end="")
    return 0


def _generate(args) -> int:
    spec = _load(args)
    if spec.data.source != "synthetic":
        raise UserError(f"data.source is {spec.data.source!r}; `distill generate` needs data.source: synthetic")
    generate(spec)
    return 0


def _report(args) -> int:
    path = storage.join(args.run_dir, "metrics.json")
    if not storage.exists(path):
        raise UserError(f"{path} not found: either the run is unfinished (metrics.json is written when the run "
                        f"ends) or {args.run_dir} is not a run directory; pass the directory of a finished "
                        "`distill run`")
    try:
        metrics = storage.read_json(path)
    except ValueError as exc:  # a truncated or hand-edited file
        raise UserError(f"{path} is not valid JSON ({exc}); rerun the job to rewrite it") from None
    print(write_report(args.run_dir, metrics))
    print(f"wrote {storage.join(args.run_dir, 'report.md')}, report.html and the plots under "
          f"{storage.join(args.run_dir, 'plots')}")
    return 0


def _export(args) -> int:
    from pipeline.stages.export import export_finished_run  # loads torch: only this command needs it

    for variant, result in export_finished_run(args.run_dir, args.model, args.format).items():
        parity = result["parity"]
        figure = (f"max |logit diff| {parity['max_abs_diff']:.2g} (tolerance {parity['tolerance']:g})"
                  if parity.get("tolerance") is not None else f"AUC loss {parity.get('auc_loss', 0):.5f}")
        print(f"{variant}: {result['dir']} ({result['bytes']:,} bytes); parity on {parity['rows']:,} "
              f"evaluation rows: {figure}")
    return 0


def _score(args) -> int:
    from pipeline.serving import score_log

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    result = score_log(args.model_dir, args.log, args.out, threads=args.threads, delimiter=args.delimiter)
    print(f"scored {result['rows']:,} rows from {result['files']} file(s) into {result['out']}")
    return 0


def _submit(args) -> int:
    spec = _load(args)  # validated here: a bad spec never reaches the cluster
    for warning in submit.submit_warnings(spec):
        print(f"warning: {warning}", file=sys.stderr)
    client = submit.connect(args.address, args.timeout)
    job_id = submit.submit(client, spec, source=" ".join([args.spec, *(f"--set {o}" for o in args.overrides)]),
                           max_upload_mb=args.max_upload_mb)
    print(f"submitted job {job_id} to {client.get_address()} (run directory {spec.run_dir} on the cluster)")
    if not args.wait:
        print(f"follow it with: distill logs {job_id} --follow; stop it with: distill stop {job_id}")
        return 0
    try:
        info = submit.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (distill stop {job_id} ends it)", file=sys.stderr)
        return 130
    return _final_status(job_id, info)


def _final_status(job_id: str, info) -> int:
    if str(info.status) == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    lines = (info.message or "no message from the cluster").splitlines()
    if len(lines) > 16:  # the message repeats the log's tail, already printed: keep its first and last lines
        lines = [lines[0], f"[... {len(lines) - 13} lines, see `distill logs {job_id}` ...]", *lines[-12:]]
    print(f"error: job {job_id} {info.status}: " + "\n".join(lines), file=sys.stderr)
    return 1


def _status(args) -> int:
    info = submit.job_info(submit.connect(args.address, args.timeout), args.job_id)
    print(f"job {args.job_id}: {info.status}\n  message: {info.message}\n  started: {_when(info.start_time)}"
          f"  ended: {_when(info.end_time)}\n  entrypoint: {info.entrypoint}")
    if run_dir := (info.metadata or {}).get("distill_run_dir"):
        print(f"  run directory: {run_dir}")
    return 0


def _logs(args) -> int:
    client = submit.connect(args.address, args.timeout)
    if args.follow:
        return _final_status(args.job_id, submit.follow(client, args.job_id))
    print(submit.job_logs(client, args.job_id), end="")
    return 0


def _stop(args) -> int:
    client = submit.connect(args.address, args.timeout)
    if submit.stop(client, args.job_id):
        print(f"stopping job {args.job_id}; `distill status {args.job_id}` shows when it has stopped")
    else:
        print(f"job {args.job_id} had already ended: {submit.job_info(client, args.job_id).status}")
    return 0


def _jobs(args) -> int:
    jobs = submit.list_jobs(submit.connect(args.address, args.timeout))
    print(f"{'JOB':<44} {'STATUS':<10} {'STARTED':<19} SPEC")
    for job in jobs:
        spec = (job.metadata or {}).get("distill_spec", "-")
        print(f"{job.submission_id or job.job_id:<44} {str(job.status):<10} {_when(job.start_time):<19} {spec}")
    return 0


def _when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else "-"


def _nightly(args) -> int:
    spec = _load(args)
    if spec.schedule is None:
        raise UserError(f"{args.spec} has no schedule section; `distill nightly` needs one (see jobs/nightly.yaml)")
    day = args.date or data_date(dt.datetime.now(zoneinfo.ZoneInfo(spec.schedule.timezone)))
    with quiet_console(spec.nightly_dir, verbose=args.verbose or bool(args.address)):
        _cycle_runner(args, spec)(day)
    return 0


def _schedule(args) -> int:
    # Lazy (here and in _cycle_runner): pipeline.nightly imports the stages, hence torch.
    from pipeline import nightly

    spec = _load(args)
    if args.dry_run:
        if not (args.start and args.end):
            raise UserError("--dry-run needs --from YYYY-MM-DD and --to YYYY-MM-DD")
        done = set(nightly.finished_days(spec))
        for fire, day in nightly.plan(spec, args.start, args.end):
            window = nightly.cycle_spec(spec, day).data.train_days
            state = "done" if day in done else "would run"
            print(f"{fire.isoformat()}  evaluate {day}  train {window.start}..{window.end}  {state}")
        return 0
    nightly.run_scheduler(spec, _cycle_runner(args, spec))
    return 0


def _cycle_runner(args, spec):
    """Runs a cycle here, or submits `distill nightly --date D` to a cluster and waits for it."""
    if not args.address:
        from pipeline.nightly import run_cycle

        return lambda day: run_cycle(spec, day)

    def submit_cycle(day) -> None:
        client = submit.connect(args.address)
        job_id = submit.submit(client, spec, command=f"nightly --date {day.isoformat()}")
        info = submit.follow(client, job_id)
        if str(info.status) != "SUCCEEDED":
            raise UserError(f"the nightly cycle for {day} failed on the cluster (job {job_id}): {info.message}")

    return submit_cycle


def _registry(args) -> int:
    spec = _load(args)
    if spec.schedule is None:
        raise UserError(f"{args.spec} has no schedule section, so no registry; add schedule.registry")
    root, model = spec.schedule.registry, spec.registry_model_name
    if args.action == "list":
        champion = registry.current(root, model)
        for version in registry.list_versions(root, model):
            print(f"{'*' if version == champion else ' '} {version}")
    elif args.action == "rollback":
        print(f"CURRENT is now {registry.rollback(root, model)}")
        write_history_page(spec)
    elif not args.version:
        raise UserError(f"`distill registry {args.action}` needs a version id (see `distill registry list`)")
    elif args.action == "show":
        details = registry.show(root, model, args.version)  # checks the version exists
        card = registry.card(root, model, args.version)
        problems = registry.export_problems(root, model, args.version)
        print(card or json.dumps(details, indent=2, default=str))
        print(f"version {args.version}: {details['path']}" + (" (CURRENT)" if details["current"] else "")
              + (f"; cannot serve: {'; '.join(problems)}" if problems else ""))
    else:
        registry.promote(root, model, args.version, reason="manual promotion")
        print(f"CURRENT is now {args.version}")
        write_history_page(spec)
    return 0


def _history(args) -> int:
    spec = _load(args)
    if spec.schedule is None:
        raise UserError(f"{args.spec} has no schedule section, so no nightly history; add one (see jobs/nightly.yaml)")
    print(f"wrote {write_history_page(spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
