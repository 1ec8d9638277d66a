"""The command line as a newcomer meets it: file paths, options with help, one-line errors, exit codes.

Each check runs `fxfuse.cli.main` in a fresh Python process (factories are imported by path and change
sys.path); the argument lists share one process because each start imports torch (~3 s)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxfuse import families
from fxfuse.cli import make_parser

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import contextlib, io, json, sys
from fxfuse.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""

FILES = {
    "blocks.py": """
        import torch
        def pool():
            return torch.nn.MaxPool2d(5, 1, 2)
    """,
    "mymodels.py": """
        import torch
        from blocks import pool  # a sibling module, as `python mymodels.py` would find it

        class Pyramid(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = pool()

            def forward(self, x):
                y1 = self.m(x)
                y2 = self.m(y1)
                return torch.cat([x, y1, y2, self.m(y2)], 1)

        def make_model():
            return Pyramid().eval(), (torch.randn(1, 4, 16, 16),)

        def broken():
            raise ValueError("bad config")
    """,
    "pkg/__init__.py": "",
    "pkg/models.py": """
        from .layers import make  # a relative import: the file is loaded as pkg.models

        def make_model():
            return make()
    """,
    "pkg/layers.py": """
        import torch

        class Attention(torch.nn.Module):
            def forward(self, q, k, v):
                return torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1) @ v

        def make():
            return Attention(), tuple(torch.randn(3, 1, 2, 16, 8))
    """,
}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # a CPU machine as users have it: no Triton interpreter
    env.pop("FXFUSE_VERBOSE", None)
    return env


def _one_line(result: dict, code: int, *fragments: str) -> None:
    lines = result["stderr"].splitlines()
    assert result["code"] == code and len(lines) == 1, result
    assert all(f in lines[0] for f in fragments), result
    assert "Traceback" not in result["stderr"] and not result["stdout"], result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name, text in FILES.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_cli_paths_options_and_errors(project):
    runs = {
        "file": ["explain", "./mymodels.py:make_model"],
        "package": ["explain", "pkg/models.py:make_model", "--backend", "triton", "--patterns", "attention"],
        "backend": ["explain", "mymodels.py:make_model", "--backend", "bogus"],
        "patterns": ["explain", "mymodels.py:make_model", "--patterns", "attention,convolution"],
        "module": ["explain", "no_such_module:make_model"],
        "missing": ["explain", "missing.py:make_model"],
        "attr": ["explain", "mymodels.py:nope"],
        "broken": ["explain", "mymodels.py:broken"],
        "no_dir": ["export", "mymodels.py:make_model", "-o", "no_dir/m.onnx"],
        "is_dir": ["export", "mymodels.py:make_model", "-o", "."],
        "opset": ["export", "x:y", "--opset", "many"],
        "nothing": [],
        "version": ["--version"],
        "demo": ["demo", "examples.attention_models:make_padded_mha"],
    }
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(runs.values()))], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = dict(zip(runs, json.loads(proc.stdout)))
    file_ok, package, demo, version = r["file"], r["package"], r["demo"], r["version"]

    assert file_ok["code"] == 0 and not file_ok["stderr"], file_ok
    assert "1 rewrite(s) applied" in file_ok["stdout"] and "at mymodels.py:" in file_ok["stdout"]

    # a file in a package, with a relative import; triton asked for on a CPU machine says why it is not used
    assert package["code"] == 0 and not package["stderr"], package
    report = " ".join(package["stdout"].split())
    assert "attention applied reference" in report and "spp" not in report, report
    assert "backend='triton': the inputs are on cpu" in report and "reference implementation" in report

    _one_line(r["backend"], 2, "--backend", "invalid choice", "'bogus'")
    _one_line(r["patterns"], 2, "convolution", *families.names())
    _one_line(r["module"], 2, "no_such_module", "file path")
    _one_line(r["missing"], 2, "no such file: missing.py")
    _one_line(r["attr"], 2, "has no 'nope'")
    _one_line(r["broken"], 1, "ValueError: bad config", "FXFUSE_VERBOSE=1")
    _one_line(r["no_dir"], 2, "does not exist")
    _one_line(r["is_dir"], 2, "is a directory")
    _one_line(r["opset"], 2, "--opset", "invalid int value")
    _one_line(r["nothing"], 2, "COMMAND")
    assert version["code"] == 0 and version["stdout"].startswith("fxfuse 0.1.0 (torch "), version
    assert len(version["stdout"].splitlines()) == 1 and not version["stderr"]

    assert demo["code"] == 0, demo
    for result in (file_ok, package, demo):
        too_wide = [line for line in result["stdout"].splitlines() if len(line) > 100]
        assert not too_wide, too_wide
    assert "padded_mha" in demo["stdout"].splitlines()[-1] and "whole model" in demo["stdout"]


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, action


def test_every_option_has_help_and_patterns_list_the_registered_families():
    actions = list(_actions(make_parser()))
    undocumented = [(prog, a.dest) for prog, a in actions if not a.help]
    assert not undocumented, undocumented
    patterns_help = [a.help for _, a in actions if a.dest == "patterns"]
    assert len(patterns_help) == 2 and all(name in h for h in patterns_help for name in families.names())


def test_demo_outside_the_repository_says_where_to_run_it(monkeypatch, capsys):
    import importlib.util

    from fxfuse.cli import main

    find_spec = importlib.util.find_spec
    no_examples = lambda name, *rest: None if name == "examples" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", no_examples)
    with pytest.raises(SystemExit) as exc:
        main(["demo"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "from the repository root" in err, err
