"""``swap_in``: run a model's local operators on our kernels, in place, with one call;
``swap_out``: put third-party modules back on their own code.

The adapter table (``ultron_kernels.adapters``) decides what is recognised and how it is
converted. State_dict keys and shapes never change, so checkpoints load before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ultron_kernels.adapters import Unsupported, adapters, restore
from ultron_kernels.backends import BACKENDS


@dataclass
class SwapReport:
    """What ``swap_in`` converted and what it left alone, each with the reason."""
    backend: str
    swapped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, module, what now runs)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, module, why not)

    def __str__(self) -> str:
        lines = [f"swap_in(backend={self.backend!r}): {len(self.swapped)} module(s) converted, "
                 f"{len(self.skipped)} left alone"]
        lines += [f"  converted {path or '<root>'} ({kind}): {note}" for path, kind, note in self.swapped]
        lines += [f"  left alone {path or '<root>'} ({kind}): {why}" for path, kind, why in self.skipped]
        return "\n".join(lines)


def swap_in(model: nn.Module, backend: str = "auto") -> SwapReport:
    """Convert every module of ``model`` that an adapter recognises to run on ``backend``:
    our own modules (the backend attribute; split + conv + cat becomes one fused conv with
    the same weights and keys), timm's and torchvision's Swin attention (one window-attention
    call per block), timm's depthwise MixedConv2d, InceptionDWConv2d and ConvRelPosEnc (one
    grouped depthwise convolution each). Returns the report of what was converted and what was left alone, why."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    table = adapters()
    report = SwapReport(backend)
    for path, module in list(model.named_modules()):
        adapter = next((a for a in table if a.matches(module)), None)
        if adapter is None:
            continue
        try:
            replacement, note = adapter.convert(module, backend)
        except Unsupported as why:
            report.skipped.append((path, adapter.name, str(why)))
            continue
        if replacement is not module:
            if not path:
                # Converting replaces a module inside its parent; the root has none.
                raise ValueError(f"swap_in converts the modules inside `model`, and `model` itself is "
                                 f"a {type(module).__name__}: convert it with "
                                 "ChannelwiseDilatedConv2d.from_split_convs(list(model.convs), backend)")
            parent_path, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, name, replacement)
        report.swapped.append((path, adapter.name, note))
    return report


def swap_out(model: nn.Module) -> list[str]:
    """Put every third-party module converted by :func:`swap_in` back on its own code (our own
    modules stay: ``swap_in(model, "reference")`` routes them to the PyTorch path). Returns
    the paths restored."""
    return [path for path, module in list(model.named_modules()) if restore(module)]
