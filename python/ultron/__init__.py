"""Reference ULTRON model: a consumer of ultron_kernels (see README for our reading of it)."""

from __future__ import annotations

from ultron.configs import CONFIGS, DEFAULTS
from ultron.model import Ultron

BACKENDS = ("reference", "triton", "cuda", "auto")


def build(name: str, backend: str = "reference", **overrides) -> Ultron:
    """Build a configuration from :data:`CONFIGS` with its local ops on ``backend``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown ULTRON config {name!r}; choose one of {sorted(CONFIGS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    config = {**DEFAULTS, **CONFIGS[name]}
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)} for {name}")
    config.update(overrides)
    return Ultron(**config, backend=backend)


__all__ = ["CONFIGS", "build", "Ultron"]
