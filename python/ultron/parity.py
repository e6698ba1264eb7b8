"""Whole-model parity: the same weights on two backends, outputs and every gradient."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import ultron_kernels as uk


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def training_step(model, images, labels, autocast_dtype=None):
    """One forward + backward; returns (descriptors, logits, loss) with grads on the model."""
    model.zero_grad(set_to_none=True)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        descriptors, logits = model(images, labels)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return descriptors.detach(), logits.detach(), loss.detach()


def compare_backends(model, backend: str, images, labels, autocast_dtype=None) -> dict:
    """Run ``model`` (reference backend) and a copy swapped to ``backend`` on one batch.

    Gradient errors are relative per parameter, with the denominator floored at 1e-4 of the
    largest parameter-gradient norm: some gradients are zero in exact arithmetic (a bias added
    to every key cancels in the softmax) and their rounding noise has no scale of its own.
    """
    kernel_model = copy.deepcopy(model)
    report = uk.swap_in(kernel_model, backend)
    ref = training_step(model, images, labels, autocast_dtype)
    got = training_step(kernel_model, images, labels, autocast_dtype)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    floor = 1e-4 * max(g.norm().item() for g in ref_grads.values())
    worst_name, worst = "", 0.0
    for name, p in kernel_model.named_parameters():
        if name not in ref_grads:
            continue
        if p.grad is None:
            return dict(ok=False, error=f"no gradient for {name} on backend {backend}")
        err = ((p.grad.double() - ref_grads[name].double()).norm()
               / max(ref_grads[name].double().norm().item(), floor)).item()
        if err > worst:
            worst_name, worst = name, err
    return dict(descriptor=_rel(got[0], ref[0]), logits=_rel(got[1], ref[1]),
                loss=abs(got[2].item() - ref[2].item()), grad=worst, grad_name=worst_name,
                swapped=len(report.swapped))


# Tolerances of compare_backends' errors: float32 end to end, and bf16 autocast (both paths
# then round activations to bf16 at different places, so errors are at bf16's resolution).
TOLERANCES = {
    "float32": dict(descriptor=1e-4, logits=1e-4, loss=1e-3, grad=1e-3),
    "bf16-autocast": dict(descriptor=5e-2, logits=5e-2, loss=5e-2, grad=1e-1),
}


def failures(result: dict, mode: str) -> list[str]:
    if "error" in result:
        return [result["error"]]
    return [f"{k}: {result[k]:.3g} > {tol:g}" for k, tol in TOLERANCES[mode].items() if result[k] > tol]
