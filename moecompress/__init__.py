"""moecompress: make Mixture-of-Experts language models smaller while keeping them good."""

__version__ = "0.1.0"
