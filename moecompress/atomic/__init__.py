"""Atomic (neuron-level) pruning of routed experts: HEAPr scores, gradient statistics, channel slicing.

heapr (scores, selection), gradstats (G_e accumulators), apply (slicing), compensate (down_proj refit): pure tensor
functions raising ValueError. gradstream: the HEAPr gradient pass (engine forward, then backward layer by layer).
transform: ``AtomTransform``, the per-layer engine transform (and ``transform_for_recipe`` for `compress`).
run: ``atomic_prune``, the `prune --granularity atom` entry point. load: the exact-layout loader.
"""
