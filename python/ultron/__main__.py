"""`python -m ultron {demo,train,evaluate} [options]`: the reference ULTRON model's command line."""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels still run, for parity: Triton's through its interpreter
    # (switched on before triton is imported), CUDA's through the host simulation.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ULTRON_KERNELS_CUDA_SIM", "1")


def build_parser() -> argparse.ArgumentParser:
    from ultron import demo, evaluate, train
    from ultron.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m ultron",
        description="ULTRON (ACCV 2024) with the ultron_kernels local operators swapped in.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,evaluate}")
    for name, module, summary in (
            ("demo", demo, "whole-model parity of the kernel backends vs PyTorch (and GPU timings)"),
            ("train", train, "train on the sample photos or an ImageFolder (torchrun for DDP)"),
            ("evaluate", evaluate, "retrieval mAP on revisited Oxford / Paris (Easy, Medium, Hard)")):
        sub = commands.add_parser(name, help=summary, description=module.__doc__,
                                  formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
