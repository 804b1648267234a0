"""The supported transformers range: the installed version is inside the pyproject pin, and the model facts the
code relies on hold on it. bench/compat_check.sh runs this file (and a subset of the suite) on transformers 5.17.0,
the lower end and the GPU machine's version; the normal run covers the newest allowed version."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM

from moecompress.core.checkpoint import builtin_model_dir
from moecompress.core.families import family_for

ROOT = Path(__file__).resolve().parents[2]


def _pin(name: str) -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{name}([<>=!~][^"]*)"', text)
    assert m, f"no {name} pin in pyproject.toml"
    return SpecifierSet(m.group(1))


def test_installed_transformers_is_inside_the_pin():
    v = Version(transformers.__version__)
    assert v in _pin("transformers"), f"transformers {v} is outside the pin {_pin('transformers')}"
    want = os.environ.get("MOECOMPRESS_EXPECT_TRANSFORMERS")  # set by bench/compat_check.sh
    if want:
        assert str(v) == want, f"the compat run meant {want} but imported {v} from {transformers.__file__}"


def test_lower_end_of_the_pin_is_the_gpu_machines_version():
    """5.17 is what the GPU machine has (bench/GPU_CHECK.md); bench/compat_check.sh tests exactly that version."""
    pin = _pin("transformers")
    assert Version("5.17.0") in pin and Version("5.16.1") not in pin
    assert Version("5.23.0") in pin


def test_builtin_config_expert_count_and_eager_experts_load():
    """The built-in config names its experts only with ``num_local_experts``; Qwen3-MoE reads it (5.17 and later),
    and ``experts_implementation="eager"`` (the loaders' choice) is accepted and equals the default kernel."""
    path = builtin_model_dir()
    cfg = AutoConfig.from_pretrained(path)
    assert family_for(cfg).num_experts(cfg) == 16
    assert cfg.num_experts == 16
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    default = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.arange(40).reshape(2, 20) * 7
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, default(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
