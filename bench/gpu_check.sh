#!/usr/bin/env bash
# GPU check: the label stage with GPU actors (label.gpus_per_actor 1, label.precision bf16), a bf16
# DeepSpeed training run (train.use_gpu true), and the exported ONNX teacher on ONNX Runtime's CUDA provider
# where the installed onnxruntime has it; prints rows/s, samples/s and the GPU's peak memory in each.
#
#   bash bench/gpu_check.sh                       # 1M rows labelled, 256k rows trained
#   GPU_CHECK_ROWS=200000 bash bench/gpu_check.sh # smaller
#   GPU_CHECK_FORCE_CPU=1 bash bench/gpu_check.sh # exercise the same code on CPU (fp32, no GPU resources)
#   GPU_CHECK_ACTORS=4 bash bench/gpu_check.sh    # 4 label actors sharing the GPU (gpus_per_actor 0.25)
#
# On a machine without a GPU it prints "no GPU" and exits 0. It creates .venv (make .venv/.installed,
# the Makefile's pinned versions) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    echo "gpu_check: .venv missing; installing the pinned dependencies (make .venv/.installed)"
    make .venv/.installed
fi

if [[ "${GPU_CHECK_FORCE_CPU:-0}" != "1" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
        echo "gpu_check: no GPU (nvidia-smi finds none); nothing to check"
        exit 0
    fi
    nvidia-smi -L
    if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: nvidia-smi sees a GPU but this venv's torch has no CUDA ($(.venv/bin/python -c \
'import torch; print(torch.__version__)')): install a CUDA build of the pinned torch version" >&2
        exit 2
    fi
fi

cd bench
exec ../.venv/bin/python - <<'EOF'
"""Label with GPU actors, then train with bf16 DeepSpeed on the labels; prints rows/s and samples/s."""
import os
import shutil
import threading
import time

import common

force_cpu = os.environ.get("GPU_CHECK_FORCE_CPU") == "1"
rows = int(os.environ.get("GPU_CHECK_ROWS", 1_000_000))
train_rows = min(rows, int(os.environ.get("GPU_CHECK_TRAIN_ROWS", 262_144)))
actors = int(os.environ.get("GPU_CHECK_ACTORS", 1))
gpu = 0 if force_cpu else 1 / actors
root, days = common.click_log(rows, 1)
spec = common.bench_spec(
    root, days, common.DATA / "gpu-check",
    label={"batch_size": 65536, "actors": [actors, actors], "cpus_per_actor": 1, "gpus_per_actor": gpu,
           "precision": "fp32" if force_cpu else "bf16"},
    train={"num_workers": 1, "cpus_per_worker": 1, "use_gpu": not force_cpu, "epochs": 1, "batch_size": 8192,
           "zero_stage": 0, "precision": "fp32" if force_cpu else "bf16", "shuffle_buffer_rows": 0},
)
shutil.rmtree(common.DATA / "gpu-check", ignore_errors=True)


class PeakGpuMemory:
    """Samples the GPU's used memory (NVML, every process on it) every 0.1 s while in the block."""

    def __enter__(self):
        self.peak, self.stop = 0, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # no NVML (CPU run): nothing to sample
            self.read = None
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.read and not self.stop.wait(0.1):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def __str__(self):
        return f"peak GPU memory used {self.peak / 2**30:.2f} GiB" if self.read else "GPU memory: no NVML"


startup = common.start_ray(max(2, os.cpu_count() or 2, actors + 1))
try:
    import ray
    import ray.data
    import torch

    import dataclasses

    from pipeline.stages.label import label_days
    from pipeline.stages.students import DISTILLED, student_run
    from pipeline.train import TrainRequest, train_model

    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}; "
          f"Ray resources {ray.cluster_resources()}; ray.init {startup:.1f} s", flush=True)

    # 1) label stage with GPU actors, bf16 autocast
    started = time.perf_counter()
    with PeakGpuMemory() as memory:
        labelled = label_days(spec, common.ensure_teacher(), str(common.DATA / "gpu-check" / "shards"), days)
    seconds = time.perf_counter() - started
    total = labelled.shard_set.total_rows
    print(f"gpu_check: label stage: {total:,} rows in {seconds:.1f} s = {total / seconds:,.0f} rows/s "
          f"({actors} actor(s), gpus_per_actor {spec.label.gpus_per_actor:g}, precision {spec.label.precision}); "
          f"{memory}", flush=True)

    # 2) DeepSpeed bf16 training on the new soft labels (at least one optimizer step)
    files = [s.path for s in labelled.shard_set.shards]
    columns = [spec.features.label, "teacher_logit"] + spec.features.input_columns()
    dataset = ray.data.read_parquet(files).select_columns(columns).limit(train_rows)
    run = student_run(spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1, "lr": 0.003})}),
                      DISTILLED, train_rows)
    started = time.perf_counter()
    with PeakGpuMemory() as memory:
        result = train_model(TrainRequest(run=dataclasses.replace(run, role="gpu-check"), dataset=dataset,
                                          model_path=str(common.DATA / "gpu-check" / "student.pt"),
                                          run_dir=spec.run_dir))
    call = time.perf_counter() - started
    epoch = result.history[-1]
    print(f"gpu_check: DeepSpeed {spec.train.precision} training: {epoch['rows']:,} samples, "
          f"{epoch['rows'] / epoch['seconds']:,.0f} samples/s in the loop, {epoch['rows'] / call:,.0f} samples/s "
          f"for the whole train_model call ({call:.1f} s; use_gpu {spec.train.use_gpu}, batch "
          f"{spec.train.batch_size}); {memory}", flush=True)

    # 3) the teacher exported to ONNX, on ONNX Runtime's CUDA provider where this onnxruntime has it
    import numpy as np
    import onnxruntime as ort
    import pyarrow.parquet as pq

    from pipeline.export import eager_logits, export_model
    from pipeline.features import table_to_arrays
    from pipeline.models import load_model
    from pipeline.serving import OnnxModel, parity_report

    providers = ort.get_available_providers()
    provider = "CPUExecutionProvider" if force_cpu else "CUDAExecutionProvider"
    if provider not in providers:
        print(f"gpu_check: ONNX Runtime {ort.__version__} here has no {provider} (providers {providers}): "
              "the ONNX teacher on GPU is not checked", flush=True)
    else:
        model, config, layout = load_model(common.ensure_teacher())
        table = pq.read_table(files[0]).slice(0, 65536)
        arrays = table_to_arrays(table, layout)
        exported = export_model(model, config, layout, "onnx", raw_columns={}, dense_fill=0.0,
                                sequence_delimiter=None, about={"role": "teacher"})
        with PeakGpuMemory() as memory:
            session = OnnxModel(exported.model, providers=[provider])
            logits = session(arrays)  # warm-up
            started, calls = time.perf_counter(), 10
            for _ in range(calls):
                session(arrays)
            seconds = time.perf_counter() - started
        parity = parity_report(eager_logits(model, arrays), logits, None, 1e-4)
        print(f"gpu_check: ONNX Runtime {ort.__version__} {provider}: {calls * len(logits) / seconds:,.0f} rows/s "
              f"at batch {len(logits):,} (fp32); max |logit diff| vs eager CPU {parity['max_abs_diff']:.2g}; {memory}",
              flush=True)
finally:
    common.stop_ray()
EOF
