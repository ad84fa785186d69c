"""`python -m dopd_vl.cli ...` (torchrun, accelerate launch -m): the `dopd` command."""

import sys

from dopd_vl.cli.main import main

sys.exit(main())
