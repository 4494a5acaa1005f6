"""A plain run's training fixed costs, this code against the code before issue 20 (commit 111cdce), run in turns.

A plain run (no search, no validation split: the demo job as it was at the baseline) trains a teacher, a
distilled student and a hard-label student. Its training fixed cost is what stages 2 (teacher) and 4 (students)
take beyond their training loops: worker start-up, imports, DeepSpeed set-up, Ray Data's first batch,
checkpoints, and the stage's own reads. The baseline makes three training calls (teacher; distilled; hard);
this code makes two (teacher and hard-label student in one pass; the distilled student).

Each version runs `distill run` on the same spec in a subprocess with its own source tree (the baseline from a
`git worktree` of BASELINE), alternating baseline, current, baseline, current, ... so that the machine's drift
falls on both; each run's fixed cost is

    (stage 2 seconds + stage 4 seconds) - the training loops' seconds (each pass's epochs, from models/*.json)

    .venv/bin/python bench/fixed_costs.py            # 2 rounds, recorded (bench/results.py)
    .venv/bin/python bench/fixed_costs.py --rounds 1 --no-append
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

import common
import results as bench_results

BASELINE = "111cdce"  # the last commit before issue 20: three training calls a plain run
TARGET = "the sum of a plain run's training fixed costs (teacher plus students) at most half the baseline's"
STAGE_DONE = re.compile(r"\[stage (\d)/\d\] done[^\n]*?([\d.]+)s")


def baseline_tree(commit: str) -> Path:
    """A worktree of `commit` (made once, outside the repository's own tree)."""
    tree = common.DATA / f"baseline-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), commit], cwd=common.ROOT, check=True,
                       capture_output=True)
    return tree


def plain_spec(tree: Path, work: Path) -> Path:
    """The baseline's demo job (a plain run), with its log and runs under `work`."""
    raw = yaml.safe_load(subprocess.run(["git", "show", f"{BASELINE}:jobs/demo.yaml"], cwd=common.ROOT, check=True,
                                        capture_output=True, text=True).stdout)
    raw["data"]["path"] = str(work / "clicks")
    raw["output"] = {"root": str(work / "runs")}
    path = work / "plain.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_once(tree: Path, spec: Path) -> dict:
    """One `distill run` of `spec` with the code in `tree`; its stage seconds and training loops."""
    runs = spec.parent / "runs"
    subprocess.run(["rm", "-rf", str(runs)], check=True)
    env = os.environ | {"PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec)], cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"distill run failed in {tree}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    stages = {int(n): float(s) for n, s in STAGE_DONE.findall(out.stdout)}
    run_dir = next(p for p in runs.iterdir() if (p / "models").is_dir())  # beside it: MLflow's store
    loops = pass_loops(run_dir)
    return {"wall_seconds": time.perf_counter() - started, "stage2": stages[2], "stage4": stages[4],
            "calls": len(loops), "loops": loops, "fixed": stages[2] + stages[4] - sum(loops.values())}


def pass_loops(run_dir: Path) -> dict[str, float]:
    """{training call: seconds in its loop}: a call's models share its epochs, so each epoch counts once (the
    longest any of its models recorded). The calls are Ray Train's run folders, `<role>[+<role>]-<hash>`."""
    histories = {p.stem: json.loads(p.read_text())["history"] for p in (run_dir / "models").glob("*.json")}
    loops = {}
    for folder in sorted(p.name for p in (run_dir / "train").iterdir()):
        roles = [r for r in folder.rsplit("-", 1)[0].split("+") if r in histories]
        epochs = max(len(histories[r]) for r in roles)
        loops[folder] = sum(max(histories[r][e]["seconds"] for r in roles if e < len(histories[r]))
                            for e in range(epochs))
    return loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="baseline + current runs, in turns")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing")
    args = parser.parse_args()
    load_before = os.getloadavg()
    versions = {"baseline": baseline_tree(BASELINE), "current": common.ROOT}
    specs = {name: plain_spec(tree, common.DATA / f"fixed-costs-{name}") for name, tree in versions.items()}
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    for round_ in range(args.rounds):
        for name, tree in versions.items():
            runs[name].append(run_once(tree, specs[name]))
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    bench_results.publish(render(args, runs, load_before, os.getloadavg()), dry_run=args.no_append)


def render(args, runs: dict[str, list[dict]], load_before, load_after) -> dict:
    median = {name: statistics.median(r["fixed"] for r in rs) for name, rs in runs.items()}
    ratio = median["current"] / median["baseline"]
    header = ("run", "training calls", "stage 2 s", "stage 4 s", "training loops s", "fixed s", "whole run s")
    rows = [(f"{name} #{i + 1}", r["calls"], f"{r['stage2']:.1f}", f"{r['stage4']:.1f}",
             f"{sum(r['loops'].values()):.1f}", f"{r['fixed']:.1f}", f"{r['wall_seconds']:.1f}")
            for i in range(args.rounds) for name, rs in runs.items() for r in [rs[i]]]
    verdict = "meets" if ratio <= 0.5 else "misses"
    table_md = "\n".join([
        f"The demo job as it was at {BASELINE} (a plain run: DCN-v2 teacher, MLP students, 3 days x 100k rows, 2 "
        "workers x 0.5 CPU, ZeRO 2, no validation split, no search), run by each version in turns.", "",
        common.table(rows, header), "",
        f"**Fixed cost, current / baseline: {median['current']:.1f} s / {median['baseline']:.1f} s = {ratio:.2f}** "
        f"(medians; {verdict} the target of 0.5)."])
    return {"benchmark": "fixed_costs", "title": "A plain run's training fixed costs: now against the code before "
            "issue 20", "command": common.command(),
            "machine": common.machine() + f"; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}",
            "target": TARGET, "figures": {"ratio": ratio, "median_fixed": median, "runs": runs}, "table_md": table_md}


if __name__ == "__main__":
    main()
