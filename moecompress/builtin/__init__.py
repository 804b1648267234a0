"""The small MoE language model that ships inside moecompress (see training/)."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
