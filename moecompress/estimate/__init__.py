"""Will it fit: predicted peak host/GPU memory, activation-cache disk and time per operation, from config.json.

shape = shape_of_folder("./Qwen3-30B-A3B")
est = predict(shape, "prune", samples=128, seq_len=2048, device="cuda")
check_fits(est, device)   # UserError (one line, what to change) when it would not fit
"""

from .fits import check_fits, limits_for
from .model import OPS, Estimate, Settings, coefficients, predict, time_class
from .shape import ModelShape, shape_of_config, shape_of_folder

__all__ = [
    "OPS", "Estimate", "ModelShape", "Settings", "check_fits", "coefficients", "limits_for", "predict",
    "shape_of_config", "shape_of_folder", "time_class",
]  # fmt: skip
