"""Where edgeinfer keeps its files: models and the Numba compilation cache."""
import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """$EDGEINFER_HOME, or the per-user cache directory (e.g. ~/.cache/edgeinfer)."""
    env = os.environ.get("EDGEINFER_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("edgeinfer"))


def models_dir() -> Path:
    """Directory holding downloaded, verified model files."""
    return home() / "models"
