"""Training: job configs, the accelerate-based loop, crash-safe checkpoints, run logs.

    from hybridpeft.train import load_config, train
    job = load_config("configs/default.yaml", ["adapter.method=lora", "train.max_steps=50"])
    result = train(job)            # or train(job, resume=True)
"""
from .job_config import ConfigError, JobConfig, build_config, load_config, resolve_mapping  # noqa: F401
from .loop import SimulatedCrash, TrainingAborted, TrainResult, train  # noqa: F401
