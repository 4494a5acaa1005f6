"""One nightly cycle in a process of its own, which a seeded fault injector may kill with SIGKILL (no clean-up,
no `finally`, no lock release) at a point it picks:

- "stage": on entering one of the cycle's steps (between stages);
- "write": just before the k-th rename of an atomic write (inside a stage: the temporary file is written, the
  destination not yet replaced);
- "timer": after a random delay (anywhere: mid-label, mid-training, mid-export).

    python tests/soak_cycle.py SPEC.yaml DAY [--fault SEED --within SECONDS | --kill-on registry.promote]

The process joins the Ray at RAY_ADDRESS (the test session's), as a submitted cycle joins its cluster. The
fault it armed is printed on the first line of its output ("fault: ..."), so a test can say what it did.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pipeline.nightly's names for its steps, in the order a cycle takes them; killing on entry is "between stages"
STEPS = ("ensure_click_logs", "data_aware_spec", "_teacher", "label_days", "train_challenger", "_calibrators",
         "evaluate_models", "_export_challenger", "_recalibrate", "_apply_retention", "write_history_page")
REGISTRY_STEPS = ("publish", "promote")  # pipeline.registry's, called by the cycle after its gate


def die(where: str) -> None:
    print(f"fault injector: SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(seed: int, within: float) -> str:
    """Arms one fault chosen by `seed`; returns what it is."""
    from pipeline import nightly, registry

    rng = random.Random(seed)
    kind = rng.choice(("stage", "write", "timer"))
    if kind == "stage":
        module, name = rng.choice([(nightly, n) for n in STEPS] + [(registry, n) for n in REGISTRY_STEPS])
        return kill_on_entering(module, name)
    if kind == "write":
        nth = rng.randint(1, 15)  # within what a cycle's driver writes (a kill at the 22nd never fired)
        real_replace, calls = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "pipeline.storage":  # our atomic writes only
                calls[0] += 1
                if calls[0] == nth:
                    die(f"before renaming {src} to {dst} (atomic write {nth})")
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
        return f"write: kill before the rename of atomic write {nth}"
    delay = rng.uniform(1.0, within)
    timer = threading.Timer(delay, die, args=(f"{delay:.1f}s into the cycle",))
    timer.daemon = True
    timer.start()
    return f"timer: kill {delay:.1f}s into the cycle"


def kill_on_entering(module, name: str) -> str:
    real = getattr(module, name)

    def entered(*args, **kwargs):
        die(f"on entering {module.__name__}.{name}")
        return real(*args, **kwargs)

    setattr(module, name, entered)
    return f"stage: kill on entering {module.__name__}.{name}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("day", type=dt.date.fromisoformat)
    parser.add_argument("--fault", type=int, help="arm the fault this seed picks")
    parser.add_argument("--within", type=float, default=30.0, help="the timer fault fires within this many seconds")
    parser.add_argument("--kill-on", help="instead: kill on entering this step, e.g. registry.promote")
    args = parser.parse_args()
    from pipeline import nightly, registry
    from pipeline.nightly import run_cycle
    from pipeline.spec import load_spec

    if args.kill_on:
        module, name = args.kill_on.split(".")
        fault = kill_on_entering({"nightly": nightly, "registry": registry}[module], name)
    else:
        fault = arm(args.fault, args.within) if args.fault is not None else "none"
    print(f"fault: {fault}", flush=True)
    record = run_cycle(load_spec(args.spec), args.day)
    print(f"decision: {record['decision']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
