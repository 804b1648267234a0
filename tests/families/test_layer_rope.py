"""Per-layer RoPE bases (``config.layer_rope_theta``: GraniteMoE-SWA's one rotary embedding per base, MuseSpark's
NoPE layers at 0): the layer stream records each base's layer inputs (its position embeddings, or none), not the
first layer's of the attention type (issue 12)."""

from __future__ import annotations

import family_models
import pytest
import torch
from family_checks import check_profile

from moecompress.core.checkpoint import Checkpoint
from moecompress.core.stream import LayerStream


@pytest.mark.parametrize("thetas", [[10000.0, 0, 500000.0, 10000.0]])
def test_every_rope_base_gets_its_own_position_embeddings(thetas, tmp_path, tokenizer_dir, monkeypatch):
    tiny = family_models.tiny_config

    def config(model_type: str, *a: object) -> object:
        cfg = tiny(model_type, *a)
        cfg.layer_rope_theta = list(thetas)
        return cfg

    monkeypatch.setattr(family_models, "tiny_config", config)
    ck = Checkpoint(family_models.build("granitemoe_swa", tmp_path / "granite", tokenizer_dir))
    assert ck.config.layer_rope_theta == thetas
    kinds = LayerStream(ck, torch.zeros(1, 4, dtype=torch.long)).layer_types
    assert kinds is not None and len(set(kinds)) == 4, kinds  # each layer its (attention type, base)
    check_profile(ck)  # = a brute-force loop on the transformers model (each layer its own base)
