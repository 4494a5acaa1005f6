"""The quiet console: what a run writes to stderr (Ray's Python loggers, C-level writes such as Ray's core
worker lines, warnings) lands in `<run_dir>/logs/stderr.log`; our warnings still reach the terminal; the
terminal's stderr is back afterwards, also after an error. No Ray; a child process, so that its stderr is
a real file descriptor 2 as in a terminal (pytest's capture replaces sys.stderr)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

CHILD = textwrap.dedent('''
    import logging, os, sys
    from pipeline.console import is_quiet, quiet_console

    ray_like = logging.getLogger("ray.data.fake")  # as Ray's: bound to stderr at import, not propagating
    ray_like.propagate = False
    ray_like.addHandler(logging.StreamHandler(sys.stderr))
    ray_like.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO)  # as the CLI: our INFO lines to stderr
    run_dir, verbose = sys.argv[1], sys.argv[2] == "verbose"
    try:
        with quiet_console(run_dir, verbose=verbose):
            print("quiet" if is_quiet() else "loud", flush=True)
            ray_like.info("Running Dataset: dataset_0 (Ray Data's progress)")
            os.write(2, b"[2026-12-04 04:25:18 E core_worker.cc:2465] a C++ line\\n")
            print("Parquet dataset sampling: 100%", file=sys.stderr)
            logging.getLogger("pipeline.stages.label").info("label: 3 day(s) labelled")
            logging.getLogger("pipeline.stages.label").warning("a warning the user must see")
            print("[stage 1/6] done: 1.0s", flush=True)
            raise RuntimeError("a failing stage")
    except RuntimeError:
        pass
    os.write(2, b"back on the terminal\\n")
''')


def run_child(run_dir, mode: str = "quiet") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(run_dir), mode], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)


def test_stderr_goes_to_the_run_log_and_warnings_to_the_terminal(tmp_path):
    child = run_child(tmp_path)
    assert child.stdout == "quiet\n[stage 1/6] done: 1.0s\n"
    assert child.stderr == "WARNING pipeline.stages.label: a warning the user must see\nback on the terminal\n"
    logged = (tmp_path / "logs" / "stderr.log").read_text()
    for line in ("Running Dataset: dataset_0", "a C++ line", "Parquet dataset sampling", "label: 3 day(s) labelled",
                 "a warning the user must see"):
        assert line in logged, line
    assert "back on the terminal" not in logged  # the terminal is back after the error


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    child = run_child(tmp_path, "verbose")
    assert child.stdout == "loud\n[stage 1/6] done: 1.0s\n"
    for line in ("Running Dataset: dataset_0", "a C++ line", "Parquet dataset sampling", "a warning the user must see"):
        assert line in child.stderr, line
    assert not (tmp_path / "logs").exists()
