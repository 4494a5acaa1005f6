"""The parts of the training loop: learning-rate schedules, how the loss terms combine, how shards are read,
DeepSpeed with one worker, and how the dataset reaches one worker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.runtime import HEALTH_CHECK_ENV, quick_health_checks
from pipeline.spec import DistillSpec, LRScheduleSpec, TrainSpec
from pipeline.train.driver import zero_stage_warning
from pipeline.train.engine import DistillModule, lr_lambda
from tests.conftest import free_port

SCHEDULE = {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0, "step_size": 1000, "gamma": 0.5}


def _schedule(**changes) -> LRScheduleSpec:
    return LRScheduleSpec(**SCHEDULE | changes)


def test_warmup_cosine_rises_linearly_then_follows_a_half_cosine_to_the_floor():
    f = lr_lambda(_schedule(kind="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # stays at the floor


def test_warmup_linear_and_step_decay():
    linear = lr_lambda(_schedule(kind="warmup_linear", warmup_steps=0), total_steps=100)
    assert [linear(s) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    step = lr_lambda(_schedule(kind="step", step_size=10, gamma=0.5), total_steps=100)
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    assert lr_lambda(_schedule(), total_steps=10)(7) == 1.0


def _batch() -> dict[str, torch.Tensor]:
    return {"label": torch.tensor([1.0, 0.0, 0.0, 1.0]), "teacher_logit": torch.tensor([1.5, -2.0, 0.3, 0.1]),
            "group": torch.tensor([7, 7, 9, 9]), "teacher_hidden": torch.tensor([[1.0, 0.0]] * 4)}


def test_distillation_loss_weighs_each_term_as_the_spec_says():
    student = torch.tensor([0.2, -1.0, 0.5, -0.3])
    hint_pred = torch.tensor([[0.5, 0.5]] * 4)
    distill = DistillSpec(alpha=0.3, temperature=2.0, soft_loss="kd", hint_weight=0.2, listwise_weight=0.5)
    terms = losses.distillation_loss(student, _batch(), distill, "binary", hint_pred)
    hard = F.binary_cross_entropy_with_logits(student, _batch()["label"])
    soft = losses.binary_soft_loss(student, _batch()["teacher_logit"], 2.0)
    hint = F.mse_loss(hint_pred, _batch()["teacher_hidden"])  # 0.25
    listwise = losses.listwise_kd_loss(student, _batch()["teacher_logit"], _batch()["group"], 2.0)
    assert terms["hint_loss"].item() == pytest.approx(0.25)
    expected = 0.3 * hard + 0.7 * soft + 0.2 * hint + 0.5 * listwise
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_mse_soft_loss_and_hard_only_students():
    student = torch.tensor([0.2, -1.0, 0.5, -0.3])
    distill = DistillSpec(alpha=0.0, temperature=1.0, soft_loss="mse")
    terms = losses.distillation_loss(student, _batch(), distill, "binary")
    assert terms["loss"].item() == pytest.approx(((student - _batch()["teacher_logit"]) ** 2).mean().item())
    hard_only = losses.distillation_loss(student, _batch(), None, "binary")
    assert set(hard_only) == {"loss", "hard_loss"} and hard_only["loss"] == hard_only["hard_loss"]


def test_multiclass_topk_terms_use_the_sparse_soft_labels():
    student = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    batch = {"label": torch.tensor([0, 5, 2]), "teacher_topk_indices": torch.tensor([[0, 1], [5, 4], [2, 3]]),
             "teacher_topk_values": torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, 1.0]])}
    distill = DistillSpec(alpha=0.5, temperature=1.0, soft_loss="kd")
    terms = losses.distillation_loss(student, batch, distill, "multiclass")
    soft = losses.topk_kd_loss(student, batch["teacher_topk_indices"], batch["teacher_topk_values"], 1.0)
    expected = 0.5 * F.cross_entropy(student, batch["label"]) + 0.5 * soft
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_hint_projection_trains_with_the_student_but_is_not_part_of_it():
    from pipeline.features import FeatureLayout
    from pipeline.models import ModelConfig, build_model

    layout = FeatureLayout(categorical=("a", "b"), dense=("x",))
    student = build_model(ModelConfig(model="mlp", embedding_dim=4, hash_buckets=32, hidden=(8,)), layout)
    module = DistillModule(student, hint_dim=5)
    inputs = {"categorical": torch.tensor([[1, 2], [3, 4]]), "dense": torch.tensor([[0.5], [2.0]])}
    logits, projected = module(inputs)
    assert logits.shape == (2,) and projected.shape == (2, 5)
    assert set(module.model.state_dict()) == set(student.state_dict())  # what gets exported
    with pytest.raises(ValueError, match="forward_with_hidden"):
        DistillModule(torch.nn.Linear(2, 1), hint_dim=5)


@pytest.mark.ray
def test_shards_are_read_from_the_named_files_and_columns_only(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from pipeline.data.clicklogs import read_named_files

    files = []
    for part in range(3):  # 3 shards of 100 rows with an extra column the student does not read
        path = tmp_path / f"part-{part}.parquet"
        pq.write_table(pa.table({"clicked": [part % 2] * 100, "teacher_logit": [0.5 * part] * 100,
                                 "unused": ["x"] * 100}), path)
        files.append(str(path))
    before = DataContext.get_current().use_datasource_v2

    dataset = read_named_files(files[:2], None).select_columns(["clicked", "teacher_logit"])

    assert DataContext.get_current().use_datasource_v2 == before  # only this read uses the V1 reader
    assert dataset.schema().names == ["clicked", "teacher_logit"]
    assert dataset.count() == 200 and sorted(set(dataset.to_pandas()["teacher_logit"])) == [0.0, 0.5]
    assert dataset.materialize().num_blocks() == 2  # a block per file, not Ray Data's default >= 200


def _deepspeed_against_torch(zero_stage: int, port: int, steps: int = 6) -> dict:
    """Trains two copies of a small net on the same batches, one with plain torch (the pipeline's fused AdamW,
    clip 1.0) and one through `deepspeed_engine` with world size 1; returns what the test compares."""
    import os

    import torch.distributed as dist

    from pipeline import runtime
    from pipeline.train.engine import adamw, deepspeed_engine

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    runtime.skip_deepspeed_inference_op()
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    wrapped = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    wrapped.load_state_dict(plain.state_dict())
    initial = [p.detach().clone() for p in plain.parameters()]
    config = TrainSpec(batch_size=32, zero_stage=zero_stage, precision="fp32", lr=0.05, weight_decay=0.01)
    plain_optimizer = adamw(plain.parameters(), config)
    engine = deepspeed_engine(wrapped, adamw(wrapped.parameters(), config), None, config)
    for _ in range(steps):
        x, y = torch.randn(32, 8), torch.randn(32, 1) * 10  # large targets: clipping at 1.0 is active
        loss = F.mse_loss(plain(x), y)
        plain_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_optimizer.step()
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
    gap = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), engine.module.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), initial))
    result = {"gap": gap, "moved": moved, "allreduce": engine.enable_backward_allreduce,
              "contiguous": getattr(engine.optimizer, "contiguous_gradients", None),
              "fused": engine.basic_optimizer.defaults["fused"]}
    dist.destroy_process_group()
    return result


@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_deepspeed_worker_trains_exactly_like_plain_torch(ray_cluster, zero_stage):
    """With one worker, the skipped gradient all-reduce (ZeRO 0) and the gradients left in place (ZeRO 2)
    must change nothing: DeepSpeed's steps equal plain torch's AdamW + clipping, parameter for parameter."""
    import ray

    # A fresh worker that exits afterwards: the process group and DeepSpeed's globals die with it.
    result = ray.get(ray.remote(max_calls=1, num_cpus=0.5)(_deepspeed_against_torch).remote(zero_stage, free_port()))

    assert result["allreduce"] is (zero_stage != 0)  # skipped only where DeepSpeed's optimizer does not reduce
    assert result["contiguous"] is (False if zero_stage == 2 else None)  # ZeRO 2's optimizer, no bucket copy
    assert result["fused"] is True  # DeepSpeed steps the fused AdamW it was given, not a copy of its own
    assert result["moved"] > 1e-2  # the steps did train
    assert result["gap"] < 1e-5


def test_zero_stages_above_0_with_one_worker_are_flagged_as_cost_without_saving():
    for stage in (1, 2, 3):
        warning = zero_stage_warning(1, stage)
        assert warning.startswith(f"train.zero_stage {stage} with one worker") and "use zero_stage 0" in warning
    assert zero_stage_warning(1, 0) is None
    assert [zero_stage_warning(2, stage) for stage in range(4)] == [None] * 4  # several workers share the state


def test_ray_train_checks_its_workers_every_half_second_unless_the_user_chose(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    quick_health_checks()
    assert get_env_vars_to_propagate()[HEALTH_CHECK_ENV] == "0.5"  # what Ray hands the controller
    monkeypatch.setenv(HEALTH_CHECK_ENV, "3")
    quick_health_checks()
    assert get_env_vars_to_propagate()[HEALTH_CHECK_ENV] == "3"


@pytest.mark.ray
def test_one_training_worker_reads_the_whole_dataset_without_a_split_coordinator(ray_cluster, tiny_spec_dict,
                                                                                  click_logs):
    """One worker iterates the dataset itself (`data_config`): no coordinator actor, and every row in
    each epoch, as `streaming_split` would give it."""
    import json
    from pathlib import Path

    from ray.util.state import list_actors

    from pipeline.stages.teacher import ensure_teacher
    from pipeline.spec import parse_spec

    tiny_spec_dict["data"].update(path=click_logs(days=1, rows=700),
                                  train_days={"start": "2026-11-01", "end": "2026-11-01"},
                                  eval_days={"start": "2026-11-02", "end": "2026-11-02"})
    tiny_spec_dict["teacher"].update(embedding_dim=4, hidden=[8], epochs=2)
    # Prefetching (a thread and a format pool beyond the default's one batch ahead) must not change the rows.
    tiny_spec_dict["train"].update(num_workers=1, cpus_per_worker=1, epochs=2, batch_size=128, prefetch_batches=2)
    spec = parse_spec(tiny_spec_dict)

    def actors(name: str) -> set[str]:  # alive or finished, of this whole test session
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", name)], limit=10_000)}

    before = {name: actors(name) for name in ("SplitCoordinator", "PreemptionWatcher")}
    ensure_teacher(spec)

    record = json.loads(Path(spec.run_dir, "models", "teacher.json").read_text())
    assert [(e["epoch"], e["rows"]) for e in record["history"]] == [(1, 700), (2, 700)]
    assert actors("SplitCoordinator") == before["SplitCoordinator"]
    # On the local Ray this process started, no preemption watcher (a process of its own) is started.
    assert actors("PreemptionWatcher") == before["PreemptionWatcher"]


def test_deepspeed_starts_without_mlflow_or_torch_inductor_and_keeps_its_real_classes():
    """`runtime.lean_deepspeed` in a fresh interpreter (as a training worker starts): DeepSpeed takes MLflow as
    absent and does not load torch._inductor for its Muon kernels; everything else is as installed."""
    import subprocess
    import sys

    probe = """
import sys, torch
compile_ = torch.compile
from pipeline import runtime
runtime.lean_deepspeed()
import deepspeed.autotuning.autotuner as autotuner
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print(sorted(m for m in ("mlflow", "torch._inductor") if m in sys.modules), autotuner.has_mlflow,
      torch.compile is compile_, issubclass(MuonWithAuxAdam, torch.optim.Optimizer))
import mlflow  # hidden from DeepSpeed's import only
print(mlflow.__name__)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-3:-1] == ["[] False True True", "mlflow"]  # after DeepSpeed's own lines
