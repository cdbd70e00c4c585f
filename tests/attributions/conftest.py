"""Module-scoped tiny float64 decompositions for the attribution tests (defined in attr_models.py,
which the viewer's compute tests share)."""

from attr_models import gpt2, llama, one_thread, tms  # noqa: F401
