"""Dataset attributions: which subcomponents and input tokens drive which subcomponents and output
tokens, summed over a dataset.

layout.py: the index spaces (sources, targets, alive subcomponents, connectivity); compute.py: the
connectivity probe and the per-batch grad x activation into an `Accumulator`; exact.py: its exact
integer sums and the state merges; store.py: `<run>/attributions/` and its queries."""
