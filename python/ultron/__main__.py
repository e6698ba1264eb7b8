"""`python -m ultron demo|train ...`"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through the interpreter, switched on before
    # triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "train"):
        print("usage: python -m ultron {demo,train} [options]  (train --help for its options)")
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "demo":
        from ultron.demo import main as demo
        return demo(rest)
    from ultron.train import main as train
    return train(rest)


if __name__ == "__main__":
    sys.exit(main())
