import json

import typer
from test_merge_e2e import _qwen
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from moecompress.cli.merge import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    return app


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """96 tokens (unk + printable ASCII), the tiny test model's vocabulary size."""
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>")


def test_cli_merge_runs_and_refuses(tmp_path):
    src = _qwen(tmp_path)
    _char_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 40)
    runner = CliRunner()
    out = tmp_path / "o"
    res = runner.invoke(_app(), ["merge", str(src), "--ratio", "0.9", "--seq-len", "32", "-o", str(out)])
    assert res.exit_code == 2 and "top-k" in res.output
    res = runner.invoke(_app(), ["merge", str(src), "--ratio", "0.5", "--method", "bogus", "-o", str(out)])
    assert res.exit_code == 2 and "--method" in res.output
    assert not out.exists()
    args = ["merge", str(src), "--ratio", "0.25", "--rank", "8", "--calib", str(calib), "--samples", "4"]
    res = runner.invoke(_app(), [*args, "--seq-len", "32", "--sim-tokens", "64", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "8 -> 6 experts" in res.output
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
    assert json.loads((src / "config.json").read_text())["num_local_experts"] == 8
    man = json.loads((out / "moecompress.json").read_text())
    assert man["calibration"]["samples"] == 4 and man["stages"][0]["options"]["rank"] == 8
    assert (out / "tokenizer.json").exists()
    res = runner.invoke(_app(), [*args, "--seq-len", "32", "-o", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
