"""Atomic (neuron-level) pruning of routed experts: HEAPr scores, gradient statistics, channel slicing."""
