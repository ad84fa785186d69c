"""Records -> model inputs for each view: the only modality-specific code of the engine.

`prompts` (the shared types and where p enters a prompt), `text` and `vision` (one adapter per
modality), `adapters` (the registry, `make_adapter`) and `batches` (aligned, padded views of a
batch). Qwen3 and Qwen3-VL share everything above this package.
"""
