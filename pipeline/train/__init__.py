"""Training for the teacher and the students on Ray Train `TorchTrainer` + DeepSpeed.

`driver.py` builds the trainer from a `TrainRequest`; `worker.py` is the loop each worker runs;
`engine.py` holds DeepSpeed's config, the optimizer, the lr schedule and the module DeepSpeed trains.
"""

from pipeline.train.driver import TrainPass, TrainRequest, TrainResult, train_model, train_pass
from pipeline.train.plan import TrainingRun

__all__ = ["TrainPass", "TrainRequest", "TrainResult", "TrainingRun", "train_model", "train_pass"]
