"""``swap_in``: run a model's local operators on our kernels, in place, with one call;
``swap_out``: put third-party modules back on their own code.

The adapter table (``ultron_kernels.adapters``) decides what is recognised and how it is
converted. State_dict keys and shapes never change, so checkpoints load before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ultron_kernels.adapters import Unsupported, adapters, restore
from ultron_kernels.backends import BACKENDS, auto_backend


@dataclass
class SwapReport:
    """What ``swap_in`` converted and what it left alone, each with the reason."""
    backend: str
    swapped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, module, what now runs)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, module, why not)
    resolved: str = ""   # what backend="auto" runs on the model's device, in words

    def __str__(self) -> str:
        backend = f"{self.backend!r}" + (f" -> {self.resolved}" if self.resolved else "")
        lines = [f"swap_in(backend={backend}): {len(self.swapped)} module(s) converted, "
                 f"{len(self.skipped)} left alone"]
        lines += [f"  converted {path or '<root>'} ({kind}): {note}" for path, kind, note in self.swapped]
        # One line per reason: a model's 50 depthwise convs left alone for one reason are one line.
        by_reason: dict = {}
        for path, kind, why in self.skipped:
            by_reason.setdefault((kind, why), []).append(path or "<root>")
        for (kind, why), paths in by_reason.items():
            if len(paths) == 1:
                lines.append(f"  left alone {paths[0]} ({kind}): {why}")
            else:
                shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
                lines.append(f"  left alone {len(paths)} x {kind} ({shown}): {why}")
        return "\n".join(lines)


def _opt_in_reason(keyword: str) -> str:
    return (f"conversion is opt-in: pass {keyword}=True (cuDNN is a strong peer for these; which "
            "shapes we win on is a GPU measurement, bench/NOTES.md)")


def swap_in(model: nn.Module, backend: str = "auto", *, depthwise: bool = False) -> SwapReport:
    """Convert every module of ``model`` that an adapter recognises to run on ``backend``:
    our own modules (the backend attribute; split + conv + cat becomes one fused conv with
    the same weights and keys), timm's and torchvision's Swin attention (one window-attention
    call per block), timm's depthwise MixedConv2d, InceptionDWConv2d and ConvRelPosEnc (one
    grouped depthwise convolution each), and with ``depthwise=True`` every plain depthwise
    ``nn.Conv2d`` (ConvNeXt, EfficientNet, MobileNet...; opt-in). Returns the report of what
    was converted and what was left alone, why. Modules inside a converted one are its parts
    (its own forward runs them) and are not visited."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    options = {"depthwise": depthwise}
    table = adapters()
    report = SwapReport(backend, resolved=_resolved(model) if backend == "auto" else "")
    converted: list[str] = []
    for path, module in list(model.named_modules()):
        if any(path.startswith(done + ".") for done in converted):
            continue
        adapter = next((a for a in table if a.matches(module)), None)
        if adapter is None:
            continue
        if adapter.opt_in and not options[adapter.opt_in]:
            report.skipped.append((path, adapter.name, _opt_in_reason(adapter.opt_in)))
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
        converted.append(path)
    return report


def _resolved(model: nn.Module) -> str:
    """What ``auto`` runs for this model's parameters now, in words."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return f"{auto_backend(device)} on {device} (auto decides per call; a call its kernels cannot run takes the reference)"


def swap_out(model: nn.Module) -> list[str]:
    """Put every third-party module converted by :func:`swap_in` back on its own code (our own
    modules stay: ``swap_in(model, "reference")`` routes them to the PyTorch path). Returns
    the paths restored."""
    return [path for path, module in list(model.named_modules()) if restore(module)]
