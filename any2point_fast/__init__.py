"""any2point-fast: frozen pretrained transformers of any modality as 3D point-cloud models.

The public API is what this module exports; everything else may change.
"""

from .config import Any2PointConfig, ConfigError
from .reference import ReferenceModel

__version__ = "0.1.0"

__all__ = ["Any2PointConfig", "ConfigError", "ReferenceModel", "__version__"]
