"""vqstudy: scaling studies of vector-quantized autoencoders.

The training core (`train`, `TrialConfig`, `build_quantizer`) imports no ray, optuna or
mlflow; orchestration and tracking live at the edge.
"""
from .config import ConfigError, TrialConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "TrialConfig", "__version__"]
