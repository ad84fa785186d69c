"""dopd-vl: Dual On-policy Distillation with privileged information for Qwen3-VL and Qwen3."""

__version__ = "0.1.0"
__all__ = ["diagnose"]


def __getattr__(name: str):
    # `dopd_vl.diagnose` without importing torch and transformers at `import dopd_vl`.
    if name == "diagnose":
        from dopd_vl.diagnosis import diagnose

        return diagnose
    raise AttributeError(f"module 'dopd_vl' has no attribute {name!r}")
