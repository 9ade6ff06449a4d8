"""What a user installs and meets first: a light library, `--version`, help on every argument, and a
`make clean` that keeps the downloads."""

import argparse
import shutil
import subprocess
import sys

import pytest
import tomllib
from conftest import REPO, run

import ajepa
from ajepa.cli import PIPELINE_MODULES, build_parser, main

# the pipeline's tools: the library and the HEAR module must import without any of them
BLOCKED = sorted(PIPELINE_MODULES)
BLOCKER = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow
def test_library_and_hear_module_import_without_the_pipeline_tools():
    code = BLOCKER + """
import ajepa, ajepa.hear, ajepa.cli, ajepa.downstream.linear, ajepa.data.store, ajepa.datasets.audioset
assert not [m for m in sys.modules if m.split(".")[0] in %r], sorted(sys.modules)
try:
    import dvclive
except ModuleNotFoundError:
    print("blocked")
""" % (BLOCKED,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "blocked"  # the blocker works, so the imports above really went without


@pytest.mark.slow
def test_a_stage_without_the_pipeline_tools_names_the_extra(tmp_path):
    code = BLOCKER + "from ajepa.cli import main; sys.exit(main(['preset', 'smoke', '--dry-run']))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "install the pipeline tools (pip install -e '.[pipeline]')" in r.stderr and "Traceback" not in r.stderr


def requirement_names(specs: list[str]) -> set[str]:
    return {s.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for s in specs}


def test_core_requirements_leave_the_pipeline_tools_to_the_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core, pipeline = requirement_names(project["dependencies"]), requirement_names(
        project["optional-dependencies"]["pipeline"])
    assert {"dvc", "dvclive", "snakemake", "snakemake-executor-plugin-slurm", "matplotlib"} <= pipeline
    assert not core & pipeline and {"torch", "timm", "safetensors", "soundfile"} <= core
    assert "'.[pipeline,test]'" in (REPO / "Makefile").read_text()


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"ajepa {ajepa.__version__}"


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_argument_of_every_command_has_help():
    missing = [f"{p.prog} {a.dest}" for p in parsers(build_parser()) for a in p._actions if not a.help]
    assert not missing
    assert len(list(parsers(build_parser()))) > 10


@pytest.mark.slow
def test_make_clean_keeps_the_downloads(tmp_path):
    if shutil.which("make") is None:
        import pytest
        pytest.skip("no make")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for f in ["data/downloads/ESC-50-master.zip", "data/raw/synth/a.wav", "data/features/synth/shard-0.npy",
              "results/summary.json", "models/pretrain/context_encoder.safetensors"]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    run(["make", "clean"], tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["Makefile", "data/downloads/ESC-50-master.zip"]
