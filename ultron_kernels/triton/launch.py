"""One launch path for every Triton kernel of the package: configurations that do not fit
the device are never launched.

The shared memory a configuration needs (pipeline stages, tile sizes, dtype) is known only
once Triton has compiled it, and the limit differs by architecture: 227 KB per block on
sm_90, 163 KB on sm_80, 99 KB on sm_86/sm_89. So a launcher lists its configurations in
order of preference and :func:`plan` compiles them in that order (``warmup``: the JIT's own
compile and cache, which the launch then reuses) until one fits the current device's opt-in
limit. The choice is cached per kernel, specialisation and limit; the autotuned launches
drop oversized configurations the same way (:func:`prune_to_device`).

The limit is read from Triton's active driver, as Triton's own launch check does: so
tools/compile_triton.py, which installs a driver for an architecture without its GPU,
exercises exactly this choice. In the interpreter there is no limit and the first
configuration runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import triton

from ultron_kernels.backends import autotune_config_limit, triton_interpreter_on


class ConfigurationDoesNotFit(RuntimeError):
    """No configuration of a kernel fits the device's shared memory per block."""


def shared_memory_limit() -> Optional[int]:
    """Opt-in shared memory per block of the current device (bytes); None in the interpreter."""
    if triton_interpreter_on():
        return None
    driver = triton.runtime.driver.active
    return int(driver.utils.get_device_properties(driver.get_current_device())["max_shared_mem"])


@dataclasses.dataclass
class Launch:
    """A kernel, its grid, arguments and compile-time parameters (constexprs, num_warps,
    num_stages), ready to run; ``rejected`` lists the preferred configurations that did not
    fit, with the shared memory each needed."""
    kernel: Any
    grid: Any
    args: tuple
    meta: dict
    rejected: list = dataclasses.field(default_factory=list)

    def compile(self):
        """The compiled kernel this launch runs (compiling it if needed), without running it."""
        return self.kernel.warmup(*self.args, grid=self.grid, **self.meta)

    def run(self):
        self.kernel[self.grid](*self.args, **self.meta)


_chosen: dict = {}


def _specialisation(args: Sequence, meta: dict) -> tuple:
    """What the compiled kernel can depend on: every compile-time parameter, each tensor
    argument's dtype and each integer's specialisation (equal to 1, multiple of 16)."""
    arg_keys = tuple(str(a.dtype) if hasattr(a, "data_ptr") else
                     (a == 1, a % 16 == 0) if isinstance(a, int) else type(a).__name__
                     for a in args)
    return arg_keys, tuple(sorted(meta.items()))


def plan(name: str, candidates: Sequence[dict], build: Callable[[dict], Launch]) -> Launch:
    """The launch of the first candidate configuration whose compiled shared memory fits the
    device. ``build(candidate)`` makes the launch of one candidate (its grid and buffers may
    depend on the tile). Raises ConfigurationDoesNotFit, naming every candidate, when none does."""
    limit = shared_memory_limit()
    if limit is None:
        return build(candidates[0])
    rejected = []
    for candidate in candidates:
        launch = build(candidate)
        key = (name, limit) + _specialisation(launch.args, launch.meta)
        if key not in _chosen:
            _chosen[key] = launch.compile().metadata.shared
        if _chosen[key] <= limit:
            launch.rejected = rejected
            return launch
        rejected.append((candidate, _chosen[key]))
    tried = "; ".join(f"{c} needs {shared} B" for c, shared in rejected)
    raise ConfigurationDoesNotFit(
        f"{name}: no configuration fits this device's {limit} bytes of shared memory per block "
        f"({tried})")


def prune_to_device(kernel) -> Callable:
    """An ``early_config_prune`` for ``triton.autotune`` over ``kernel``: keeps the configs
    whose compiled shared memory fits the device (the autotuner then times only those), at
    most ``autotune_config_limit()`` of them, in the list's order of preference."""
    def prune(configs, named_args, **kwargs):
        limit = shared_memory_limit()
        if limit is None:
            return configs
        most = autotune_config_limit()
        # Triton passes the launch's own keywords too (grid, warmup): not compile parameters.
        constexprs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        kept = []
        for config in configs:
            meta = dict(constexprs, **config.all_kwargs())
            args = tuple(named_args.values())
            key = (kernel.fn.__name__, limit) + _specialisation(args, meta)
            if key not in _chosen:
                _chosen[key] = kernel.warmup(*args, grid=(1,), **meta).metadata.shared
            if _chosen[key] <= limit:
                kept.append(config)
            if len(kept) == most:
                break
        if not kept:
            raise ConfigurationDoesNotFit(
                f"{kernel.fn.__name__}: none of the {len(configs)} autotuning configurations fits "
                f"this device's {limit} bytes of shared memory per block")
        return kept
    return prune


_autotuned: dict = {}


def autotune(name: str, kernel, configs: list, key: list[str]):
    """``triton.autotune`` over ``kernel`` with :func:`prune_to_device`, registered under
    ``name`` so that :func:`autotuned_kernels` can report what each tuning chose."""
    tuner = triton.autotune(configs=configs, key=key,
                            prune_configs_by={"early_config_prune": prune_to_device(kernel)})(kernel)
    _autotuned[name] = tuner
    return tuner


def autotuned_kernels() -> dict:
    """Every autotuned kernel of the package by name; each tuner's ``cache`` maps a tuning
    key to its choice."""
    return dict(_autotuned)
