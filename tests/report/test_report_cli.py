"""`moecompress report` on the command line: writes the page, defaults, one-line errors with exit code 2."""

from __future__ import annotations

from html.parser import HTMLParser

import typer
from test_report import make_runs
from typer.testing import CliRunner

from moecompress.cli.report import register


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return app


def _keyed(path) -> dict[str, dict]:
    found: dict[str, dict] = {}

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "data-key" in a:
                found[a["data-key"]] = a

    P().feed(path.read_text(encoding="utf-8"))
    return found


def test_report_cli_writes_html(tmp_path, monkeypatch):
    runs = make_runs(tmp_path)
    runner = CliRunner()
    res = runner.invoke(_app(), ["report", str(runs["prune"])])
    assert res.exit_code == 0, res.output
    assert float(_keyed(runs["prune"] / "report.html")["run0.kl_to_base"]["data-value"]) == 0.21
    out = tmp_path / "cmp" / "compare.html"
    res = runner.invoke(_app(), ["report", str(runs["prune"]), str(runs["quant"]), "-o", str(out), "--title", "T"])
    assert res.exit_code == 0, res.output
    assert float(_keyed(out)["run1.kl_to_base"]["data-value"]) == 0.3
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(_app(), ["report", str(runs["prune"]), str(runs["merge"])])
    assert res.exit_code == 0 and (tmp_path / "report.html").is_file()


def test_report_cli_missing_folder_exits_2(tmp_path):
    res = CliRunner().invoke(_app(), ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "does not exist" in res.output
    assert not (tmp_path / "nope").exists()
