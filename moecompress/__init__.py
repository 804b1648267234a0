"""moecompress: make Mixture-of-Experts language models smaller while keeping them good."""

from .version import __version__


def load(path=None, device="cpu", dtype=None):  # noqa: ANN001, ANN201 - thin lazy wrapper, see loading.load
    """Load any moecompress output (or a supported HF MoE folder) as a transformers model, exactly.

    See :func:`moecompress.core.loading.load`.
    """
    from .core.loading import load as _load

    return _load(path, device, dtype)


__all__ = ["__version__", "load"]
