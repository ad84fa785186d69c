"""Moved to `dopd_vl.loss.kernels` (the kernels sit beside the loss they fuse); this name still works."""

import warnings

from dopd_vl.loss.kernels import *  # noqa: F401,F403

warnings.warn("dopd_vl.kernels moved to dopd_vl.loss.kernels", DeprecationWarning, stacklevel=2)
