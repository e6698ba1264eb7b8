"""``swap_in``: point a model's local-op modules at a fused backend, in place."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ultron_kernels.backends import BACKENDS
from ultron_kernels.nn import ChannelwiseDilatedConv2d, SplitDilatedConv2d, WindowAttention

# Modules whose backend is an attribute: swapping keeps the module, its parameters and
# state_dict keys, so checkpoints move freely between backends.
_BACKEND_MODULES = (ChannelwiseDilatedConv2d, WindowAttention)


@dataclass
class SwapReport:
    backend: str
    swapped: list[tuple[str, str, str]] = field(default_factory=list)  # (path, from, to)

    def __str__(self) -> str:
        lines = [f"swap_in(backend={self.backend!r}): {len(self.swapped)} module(s)"]
        lines += [f"  {path}: {old} -> {new}" for path, old, new in self.swapped]
        return "\n".join(lines)


def swap_in(model: nn.Module, backend: str = "auto") -> SwapReport:
    """Route every ultron_kernels module of ``model`` to ``backend``; replace each
    :class:`SplitDilatedConv2d` (split + conv + cat) by a fused
    :class:`ChannelwiseDilatedConv2d` with the same weights and the same state_dict keys
    (``convs.<i>.weight`` / ``.bias``), so checkpoints move both ways. Returns a report of
    what changed."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if isinstance(model, SplitDilatedConv2d):
        # Converting replaces a module inside its parent; the root has none.
        raise ValueError("swap_in converts the modules inside `model`, and `model` itself is a "
                         "SplitDilatedConv2d: convert it with "
                         "ChannelwiseDilatedConv2d.from_split_convs(list(model.convs), backend)")
    report = SwapReport(backend)
    for path, module in list(model.named_modules()):
        if isinstance(module, _BACKEND_MODULES):
            report.swapped.append((path, f"{type(module).__name__}[{module.backend}]",
                                   f"{type(module).__name__}[{backend}]"))
            module.backend = backend
        elif isinstance(module, SplitDilatedConv2d):
            fused = ChannelwiseDilatedConv2d.from_split_convs(list(module.convs), backend)
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, name, fused)
            report.swapped.append((path, "SplitDilatedConv2d",
                                   f"ChannelwiseDilatedConv2d[{backend}]"))
    return report
