"""Reference ULTRON model: a consumer of ultron_kernels (see README for our reading of it).

Importing this package loads neither torch's compiler nor triton: `python -m ultron` must be
able to switch on Triton's interpreter (TRITON_INTERPRET=1) on machines without a GPU,
which only works before triton is first imported.
"""

from __future__ import annotations

from ultron.configs import CONFIGS, DEFAULTS

BACKENDS = ("reference", "triton", "cuda", "auto")


def build(name: str, backend: str = "reference", **overrides):
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
    from ultron.model import Ultron

    return Ultron(**config, backend=backend)


def __getattr__(name: str):
    if name == "Ultron":
        from ultron.model import Ultron

        return Ultron
    raise AttributeError(f"module 'ultron' has no attribute {name!r}")


__all__ = ["BACKENDS", "CONFIGS", "build", "Ultron"]
