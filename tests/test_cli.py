"""CLI start-up stays light and the scaffold produces a working plugin."""

import os
import subprocess
import sys

import pytest

from host.testing import offline_env


@pytest.mark.parametrize("argv", [["--help"], ["plugins", "list"]])
def test_light_commands_import_no_torch(argv):
    code = (
        "import sys; from host.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=offline_env(), capture_output=True)


def test_scaffolded_plugin_installs_lists_and_runs(tmp_path):
    """`host plugins new demo`, pip-installed, is listed and its hook runs in `host train`."""
    host = [sys.executable, "-m", "host"]
    subprocess.run([*host, "plugins", "new", "demo", "--path", str(tmp_path)], check=True, env=offline_env())
    plugin = tmp_path / "host-plugin-demo"
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(plugin)],
        check=True, env=offline_env(),
    )
    env = offline_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    listing = subprocess.run([*host, "plugins", "list"], env=env, capture_output=True, text=True, check=True)
    assert "demo" in listing.stdout and "host-plugin-demo" in listing.stdout and "trainer_callbacks" in listing.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests")],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert "2 passed" in tests.stdout


def test_scaffold_refuses_existing_dir(run_host, tmp_path):
    (tmp_path / "host-plugin-demo").mkdir()
    result = run_host("plugins", "new", "demo", "--path", str(tmp_path))
    assert result.exit_code == 2 and "already exists" in result.output
    assert run_host("plugins", "new", "Bad-Name", "--path", str(tmp_path)).exit_code == 2
