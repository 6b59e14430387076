"""The command line: output, --json, and exit codes on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import cepe
from cepe.cli import main


def test_info_json(tiny, capsys):
    assert main(["info", tiny[0], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["hidden_size"] == 48
    assert out["backends"]["cpu"]["available"]


def test_generate_matches_api(tiny, capsys):
    assert main(["generate", tiny[0], "--ids", "3 4 5", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = cepe.load(tiny[0]).generate(np.array([3, 4, 5]), 5)
    assert out["new_ids"] == expected.tolist()


def test_bad_input_exit_code(tiny, capsys):
    assert main(["generate", tiny[0], "--ids", "3 x"]) == 2
    assert "--ids must be integers" in capsys.readouterr().err
    assert main(["generate", tiny[0], "--ids", "3 1000"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["info", "/nonexistent/model"]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_python_dash_m(tiny):
    r = subprocess.run([sys.executable, "-m", "cepe", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cpu" in json.loads(r.stdout)["backends"]
