"""The scaler's liveness for its container HEALTHCHECK: the loop notes each completed pass in a file; the check
reads its age. Imports nothing heavy on purpose: ``python env.py healthcheck`` runs it every few seconds, in a
process where the metrics machinery (and its multiprocess directory) is not set up.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from fractal.config import Settings

__all__ = ["check_scaler_health", "health_max_age_s", "record_healthy_pass"]


def health_max_age_s(settings: Settings) -> float:
    """How old the last successful pass may be before the scaler counts as unhealthy: a few intervals."""
    return max(4 * settings.scaler_interval_s, 60.0)


def record_healthy_pass(path: Path) -> None:
    """Note a completed pass for the container HEALTHCHECK (the file's content is the Unix time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".scaler-health-")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{time.time():.3f}\n")
    os.replace(temporary, path)  # atomic: the check never reads half a file


def check_scaler_health(path: Path, *, max_age_s: float) -> str | None:
    """None when a pass completed within ``max_age_s``, else why the scaler is unhealthy."""
    try:
        last = float(path.read_text().strip())
    except FileNotFoundError:
        return f"no scaler pass has completed yet ({path} is missing)"
    except (OSError, ValueError) as error:
        return f"cannot read {path}: {type(error).__name__}"
    age = time.time() - last
    if age > max_age_s:
        return f"the last successful scaler pass was {age:.0f}s ago (more than {max_age_s:.0f}s)"
    return None
