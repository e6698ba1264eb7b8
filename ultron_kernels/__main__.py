"""`python -m ultron_kernels`: the self-check (environment, backends, parity); see selfcheck.py."""

import sys

from ultron_kernels.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
