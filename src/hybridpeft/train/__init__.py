"""Training: job configs, the accelerate-based loop, crash-safe checkpoints, run logs.

    from hybridpeft.train import load_config, train
    job = load_config("configs/default.yaml", ["adapter.method=lora", "train.max_steps=50"])
    result = train(job)            # or train(job, resume=True)
"""
from .failures import DiskFull, ResumeError, RunDirNotWritable, TrainingInterrupted  # noqa: F401
from .job_config import ConfigError, JobConfig, build_config, load_config, resolve_mapping  # noqa: F401
from .lock import RunDirBusy  # noqa: F401
from .loop import SimulatedCrash, TrainingAborted, TrainResult, train  # noqa: F401
