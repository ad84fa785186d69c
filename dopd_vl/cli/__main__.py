"""`python -m dopd_vl.cli ...` (torchrun, accelerate launch -m): the `dopd` command."""

import sys

from dopd_vl.cli.main import main

if __name__ == "__main__":  # a package walk (the kernel compiler) imports this module too
    sys.exit(main())
