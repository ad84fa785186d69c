"""The command layer: `dopd` and its subcommands (docs/design.md §5), one module each (its parser
beside its handler); nothing imports this layer.

`python -m dopd_vl.cli` runs the same entry point as `dopd` (launchers such as torchrun and
`accelerate launch -m` need a module).
"""

from dopd_vl.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
