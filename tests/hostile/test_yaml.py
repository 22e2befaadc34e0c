"""Hostile YAML: every case is refused fast, in bounded memory, with a message naming the file."""

import os
import resource
import subprocess
import sys
import threading
import time

import pytest

from host.testing import offline_env

BOMB = """\
base_model: ./m
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _validate_subprocess(path, timeout=60):
    """`host validate` in a child with a 1 GiB address-space cap: a bomb must not get near it."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30 + 2**29, 2**30 + 2**29))\n"
        "from host.cli import main\nsys.argv = ['host', 'validate', sys.argv[1]]\nmain()\n"
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=offline_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.time() - start


def test_alias_bomb_refused_fast_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc, took = _validate_subprocess(path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(path) in proc.stderr and "alias" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 30


def test_alias_bomb_under_a_nested_key(run_host, tmp_path):
    lines = ["base_model: ./m", "lora_target_modules:", "  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = run_host("validate", path)
    assert result.exit_code == 2 and "alias" in result.output


def test_a_few_aliases_are_fine(tmp_path):
    from host.yaml_io import read_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("common: &c {lora_r: 8}\nx: *c\ny:\n  <<: *c\n  lora_r: 4\n")
    assert read_yaml(path) == {"common": {"lora_r": 8}, "x": {"lora_r": 8}, "y": {"lora_r": 4}}


@pytest.mark.parametrize("shape", ["flow", "block"])
def test_deep_nesting_is_a_clean_error(run_host, tmp_path, shape):
    path = tmp_path / "deep.yaml"
    depth = 1000
    if shape == "flow":
        path.write_text("base_model: ./m\nplugins: " + "[" * depth + "]" * depth + "\n")
    else:
        path.write_text("base_model: ./m\nx:\n" + "".join("  " * i + "- \n" for i in range(1, depth)))
    result = run_host("validate", path)
    assert result.exit_code == 2, result.output
    assert "nesting deeper" in result.output and str(path) in result.output
    assert "RecursionError" not in result.output


def test_duplicate_key_names_both_lines(run_host, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("base_model: ./m\nlearning_rate: 0.1\nlora_r: 4\nlearning_rate: 0.2\n")
    result = run_host("validate", path)
    assert result.exit_code == 2
    assert "'learning_rate' is given twice" in result.output and "line 4" in result.output and "line 2" in result.output


def test_duplicate_key_in_a_dataset_entry(run_host, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("base_model: ./m\ndatasets:\n  - path: a.jsonl\n    type: completion\n    path: b.jsonl\n")
    result = run_host("validate", path)
    assert result.exit_code == 2 and "'path' is given twice" in result.output


def test_fifo_config_is_refused_without_hanging(run_host, tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=run_host("validate", fifo)), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the hung reader so the test process can exit
        with open(fifo, "w"):
            pass
        pytest.fail("host validate blocked on a FIFO")
    result = outcome["r"]
    assert result.exit_code == 2 and "not a regular file" in result.output


def test_directory_and_non_utf8_configs(run_host, tmp_path):
    assert "it is a directory" in run_host("validate", tmp_path).output
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    result = run_host("validate", bad)
    assert result.exit_code == 2 and "UTF-8" in result.output
