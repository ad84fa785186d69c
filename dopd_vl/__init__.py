"""dopd-vl: Dual On-policy Distillation with privileged information for Qwen3-VL and Qwen3."""

__version__ = "0.1.0"
