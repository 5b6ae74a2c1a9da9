"""deepsplit: disaggregated encode/language serving for Qwen3-VL-MoE style models.

This package holds what both servers share: the model code (`deepsplit.model`), the offline
checkpoint builder (`deepsplit.checkpoint`), the `deepsplit` command and the benchmarks.
"""

__version__ = "0.1.0"
