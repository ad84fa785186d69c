"""Deprecated name of `dopd_vl.answers` (answer matching); kept for one release.

Renamed because `evaluation` (matching) beside `evaluate` (the evaluation loop) was easy to misread.
"""

import warnings

from dopd_vl.answers import *  # noqa: F401,F403
from dopd_vl.answers import __all__  # noqa: F401

warnings.warn("dopd_vl.evaluation is renamed dopd_vl.answers; the old name will be removed in the next release",
              DeprecationWarning, stacklevel=2)
