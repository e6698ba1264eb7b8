"""The Triton launch path's choice of configuration (ultron_kernels/triton/launch.py), with a
stand-in kernel whose compiled shared memory is given: the first configuration that fits the
device runs, one that does not is never launched, and when none fits the error names the
kernel, every configuration and the device's limit. tools/compile_triton.py exercises the
same code on the real kernels for each architecture (test_triton_compile.py)."""

import types

import pytest

pytest.importorskip("triton")
from ultron_kernels.triton import launch  # noqa: E402


class StandInKernel:
    """Compiles to the shared memory its ``needs`` gives per BLOCK; records launches."""

    def __init__(self, needs):
        self.needs, self.compiled, self.launched = needs, [], []
        self.fn = types.SimpleNamespace(__name__="stand_in_kernel")

    def warmup(self, *args, grid, **meta):
        self.compiled.append(meta["BLOCK"])
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=self.needs[meta["BLOCK"]]))

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launched.append(meta["BLOCK"])


@pytest.fixture
def limit(monkeypatch):
    monkeypatch.setattr(launch, "_chosen", {})
    monkeypatch.setattr(launch, "shared_memory_limit", lambda: 101376)  # sm_86


def _plan(kernel, blocks):
    return launch.plan("stand-in", [dict(BLOCK=b, num_warps=4) for b in blocks],
                       lambda c: launch.Launch(kernel, (1,), (), dict(c)))


def test_first_fitting_configuration_runs(limit):
    kernel = StandInKernel({64: 147456, 32: 69632, 16: 30000})
    chosen = _plan(kernel, [64, 32, 16])
    chosen.run()
    assert kernel.launched == [32] and chosen.rejected == [(dict(BLOCK=64, num_warps=4), 147456)]
    assert kernel.compiled == [64, 32]  # 16 never needed
    _plan(kernel, [64, 32, 16])
    assert kernel.compiled == [64, 32]  # the choice is cached


def test_nothing_fits_names_kernel_configurations_and_limit(limit):
    kernel = StandInKernel({64: 147456, 32: 110000})
    with pytest.raises(launch.ConfigurationDoesNotFit, match=r"stand-in.*101376 bytes.*BLOCK': 64.*147456.*110000"):
        _plan(kernel, [64, 32])
    assert kernel.launched == []


def test_autotuner_prune_keeps_what_fits(limit):
    kernel = StandInKernel({64: 147456, 32: 69632})
    configs = [types.SimpleNamespace(all_kwargs=lambda b=b: dict(BLOCK=b, num_warps=4)) for b in (64, 32)]
    # Triton's autotuner passes the launch keywords (grid, warmup) along with the constexprs.
    kept = launch.prune_to_device(kernel)(configs, {"x": 1}, grid=(1,), warmup=False)
    assert kept == [configs[1]]
    with pytest.raises(launch.ConfigurationDoesNotFit, match="stand_in_kernel.*101376"):
        launch.prune_to_device(kernel)(configs[:1], {"x": 1})


def test_capped_autotuning_compiles_only_the_first_fitting_configurations(limit, monkeypatch):
    """ULTRON_KERNELS_AUTOTUNE_CONFIGS=K (what `make gpu-lease` sets): the autotuner times the
    first K configurations that fit, in order of preference, and compiles none past them."""
    kernel = StandInKernel({64: 147456, 32: 69632, 16: 30000, 8: 20000})
    configs = [types.SimpleNamespace(all_kwargs=lambda b=b: dict(BLOCK=b, num_warps=4)) for b in (64, 32, 16, 8)]
    monkeypatch.setenv("ULTRON_KERNELS_AUTOTUNE_CONFIGS", "2")
    assert launch.prune_to_device(kernel)(configs, {"x": 1}) == configs[1:3]
    assert kernel.compiled == [64, 32, 16]
    monkeypatch.setenv("ULTRON_KERNELS_AUTOTUNE_CONFIGS", "none")
    with pytest.raises(ValueError, match="ULTRON_KERNELS_AUTOTUNE_CONFIGS must be a positive integer, got 'none'"):
        launch.prune_to_device(kernel)(configs, {"x": 1})
