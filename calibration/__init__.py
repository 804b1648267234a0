"""Calibration and held-out evaluation text shipped with moecompress (installed as moecompress.calibration)."""
