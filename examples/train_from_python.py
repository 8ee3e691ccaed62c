"""Run a training job from Python instead of the command line.

    python examples/train_from_python.py
"""
from hybridpeft.train import load_config, train

job = load_config(
    "configs/default.yaml",
    ["adapter.method=lora", "adapter.lora.r=16", "train.max_steps=30", "output.run_dir=runs/example-lora"],
)
result = train(job)
print("before:", result.before)
print("after: ", result.after)
print("adapter:", result.adapter_dir)
