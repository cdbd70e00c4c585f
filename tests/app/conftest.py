"""The viewer's compute tests use the attribution tests' tiny float64 decompositions (fixtures
`llama`, `gpt2`, `tms`, module-scoped) and one torch thread."""

from attributions.attr_models import gpt2, llama, one_thread, tms  # noqa: F401
