"""The method (docs/design.md §1): what each token gets. The view vocabulary, the divergences, the
per-token signals and routing, and the objectives as router + routes. Tensors in, tensors out;
imports nothing above `dopd_vl.errors`."""
