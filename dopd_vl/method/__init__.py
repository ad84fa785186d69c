"""The method (docs/design.md §1): what each token gets. The view vocabulary, the divergences, the
per-token signals and routing, the objectives as router + routes, and the token plan (route,
weight and regime of each valid token). Tensors in, tensors out;
imports nothing above `dopd_vl.errors`."""
