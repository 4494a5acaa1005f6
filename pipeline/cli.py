"""`distill` command line: thin wrappers over the stages. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.errors import UserError

EXIT_USER_ERROR = 2


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

    command("run", _run, "run the job end to end: data, teacher, soft labels, students, report")
    command("validate", _validate, "check a job spec; exit 0 if valid, 2 with the problems otherwise")
    command("generate", _generate, "write the spec's synthetic click log (data.source: synthetic)")
    report = command("report", _report, "rebuild report.md from a finished run's metrics.json", with_spec=False)
    report.add_argument("run_dir", help="a run directory holding metrics.json")
    return parser


def _load(args):
    from pipeline.spec import load_spec

    return load_spec(args.spec, args.overrides)


def _run(args) -> int:
    from pipeline.evaluate import render_table
    from pipeline.job import run_job

    spec = _load(args)
    metrics = run_job(spec)
    print(f"\n{render_table(metrics['models'], metrics['eval']['ceiling_auc'])}\n")
    print(f"run directory: {spec.run_dir} (metrics.json, report.md); {metrics['wall_seconds']:.0f}s in all")
    return 0


def _validate(args) -> int:
    spec = _load(args)
    print(f"{args.spec}: valid job spec {spec.name!r} (run directory {spec.run_dir})")
    return 0


def _generate(args) -> int:
    from pipeline.job import generate

    spec = _load(args)
    if spec.data.source != "synthetic":
        raise UserError(f"data.source is {spec.data.source!r}; `distill generate` needs data.source: synthetic")
    generate(spec)
    return 0


def _report(args) -> int:
    from pipeline import storage
    from pipeline.evaluate import render_report

    path = storage.join(args.run_dir, "metrics.json")
    if not storage.exists(path):
        raise UserError(f"{path} not found; pass the directory of a finished `distill run`")
    text = render_report(storage.read_json(path))
    storage.atomic_write_text(storage.join(args.run_dir, "report.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
