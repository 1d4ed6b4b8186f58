"""The `attnzoo` command as a new user meets it: fast help, --version, methods and cache policies listed."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import attnzoo
from attnzoo.cache import policies
from attnzoo.cli import app


def _run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_the_command_starts_without_importing_torch():
    code = "import sys, attnzoo.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version():
    res = _run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"attnzoo {attnzoo.__version__}"


def test_list_and_info_cover_cache_policies():
    res = _run("list")
    assert res.exit_code == 0
    for name in list(attnzoo.methods()) + list(policies()):
        assert name in res.output
    res = _run("info", "quest")
    assert res.exit_code == 0 and "KV-cache policy" in res.output and "budget" in res.output
    res = _run("info", "nope")
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output and "quest" in res.output


def test_every_option_states_its_default():
    import click
    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for p in command.params:
            if isinstance(p, click.Option) and p.name != "help":
                shown = p.show_default is not False and p.default not in (None, False, ())
                assert shown or "default" in (p.help or ""), f"attnzoo {name} {p.opts[0]}: no default in its help"


def test_show_layout_draws_visible_sparsity_and_says_where(tmp_path, capsys, monkeypatch):
    from attnzoo.viz import show_layout

    monkeypatch.chdir(tmp_path)
    png = show_layout("bigbird", 256)  # the defaults (window 256) would read every pair at N=256
    out = capsys.readouterr().out
    assert png == tmp_path / "bigbird.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {png}" in out and "drawn with window=32" in out
