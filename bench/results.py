"""Benchmark results: one JSON file per run in bench/results/, and bench/RESULTS.md rebuilt from the newest.

Every benchmark script hands its run to `record`, which writes `bench/results/<benchmark>-<YYYYMMDD-HHMMSS>.json`
(date, command, machine, target, figures as data, the rendered Markdown) and regenerates RESULTS.md: one
section per benchmark, its newest run, in the order of ORDER. Older runs stay in bench/results/ and in git.

    python3 bench/results.py --regenerate     # rebuild bench/RESULTS.md from bench/results/*.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
# The benchmarks, in RESULTS.md's order; a benchmark not listed here follows them, by name.
ORDER = ("label_throughput", "label_throughput_onnxruntime", "train_throughput", "train_step_costs", "label_step_costs", "serving", "candidates", "memory", "memory_string_ids", "demo", "regularisation", "quality", "quality_pfd", "student_history", "student_history_movielens", "gpu_check")
HEADER = """# Benchmark results

Current figures only: the newest run of each benchmark, with its date, command, machine and target.
Every run is kept as `bench/results/<benchmark>-<YYYYMMDD-HHMMSS>.json` (the figures as data and this
section's Markdown); earlier runs and notes are in those files and in git's history of this file. What the
runs taught is in `docs/SCALING.md`.

This file is generated; do not edit it. A benchmark script records its run and rebuilds it (`--no-append`
prints only); `python3 bench/results.py --regenerate` rebuilds it from `bench/results/`.
"""


def entry(benchmark: str, title: str, command: str, machine: str, target: str, figures: dict, table_md: str,
          notes: str = "", date: str | None = None) -> dict:
    """One run as the JSON it is stored as.

    Args:
        benchmark: The benchmark's name, one of ORDER (the file name's prefix).
        title: The section's heading.
        command: The command line that reproduces the run.
        machine: Cores, memory, load, versions.
        target: What the figures are measured against.
        figures: The measured numbers, as JSON-serialisable data.
        table_md: The rendered Markdown: settings, table(s), and the lines that read them.
        notes: What a reader must know about these figures, in Markdown (shown before them).
        date: ISO date and time of the run; now if not given.

    Returns:
        The run, keys in the order they are stored.
    """
    date = date or dt.datetime.now().isoformat(timespec="seconds")
    return {"benchmark": benchmark, "title": title, "date": date, "command": command, "machine": machine,
            "target": target, "figures": figures, "table_md": table_md.strip("\n"), "notes": notes.strip("\n")}


def section(run: dict) -> str:
    """A run's section of RESULTS.md."""
    lines = [f"## {run['title']}", "", f"- Date: {run['date']}", f"- Command: `{run['command']}`",
             f"- Machine: {run['machine']}", f"- Target: {run['target']}", ""]
    if run["notes"]:  # before the figures: what a reader must know to read them
        lines += [run["notes"], ""]
    return "\n".join(lines + [run["table_md"], ""])


def save(run: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Writes a run to `results_dir/<benchmark>-<YYYYMMDD-HHMMSS>.json`; returns the path."""
    stamp = dt.datetime.fromisoformat(run["date"]).strftime("%Y%m%d-%H%M%S")
    path = Path(results_dir) / f"{run['benchmark']}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1, ensure_ascii=False, default=str) + "\n")
    return path


def record(benchmark: str, title: str, command: str, machine: str, target: str, figures: dict, table_md: str,
           notes: str = "") -> Path:
    """Stores a benchmark run and regenerates RESULTS.md; arguments as in `entry`.

    Returns:
        The run's JSON file.
    """
    path = save(entry(benchmark, title, command, machine, target, figures, table_md, notes))
    regenerate()
    return path


def publish(fields: dict, dry_run: bool) -> None:
    """Prints a run's section and, unless `dry_run` (a script's `--no-append`), records it.

    Args:
        fields: `record`'s arguments.
        dry_run: Print only; write nothing.
    """
    print("\n" + section(entry(**fields)))
    if not dry_run:
        print(f"recorded {record(**fields)}; regenerated {RESULTS_MD}")


def newest_runs(results_dir: Path) -> list[dict]:
    """The newest run of each benchmark in `results_dir` (latest date; the later file name on a tie), in ORDER."""
    newest: dict[str, tuple] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        run = json.loads(path.read_text())
        key = (run["date"], path.name)
        if run["benchmark"] not in newest or key > newest[run["benchmark"]][0]:
            newest[run["benchmark"]] = (key, run)
    rank = {name: i for i, name in enumerate(ORDER)}
    names = sorted(newest, key=lambda name: (rank.get(name, len(ORDER)), name))
    return [newest[name][1] for name in names]


def regenerate(results_dir: Path = RESULTS_DIR, out_path: Path = RESULTS_MD) -> str:
    """Rebuilds RESULTS.md from the newest run of each benchmark; the same files give the same bytes.

    Args:
        results_dir: The folder of run files.
        out_path: The Markdown file to write.

    Returns:
        The text written.
    """
    text = "\n".join([HEADER, *(section(run) for run in newest_runs(results_dir))])
    Path(out_path).write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help="rebuild RESULTS.md from bench/results/*.json")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args()
    if not args.regenerate:
        parser.error("nothing to do: pass --regenerate")
    text = regenerate(args.results_dir, args.out)
    print(f"wrote {args.out}: {len(text.splitlines())} lines")


if __name__ == "__main__":
    main()
