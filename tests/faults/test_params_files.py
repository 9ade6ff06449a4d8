"""Parameter files a careless or hostile hand wrote: a YAML alias bomb, a duplicate key, a typo that
asks for a giant encoder, more mel bins than the FFT can fill. Each is one line naming the file and
the key, before anything is allocated; none is read silently."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params
from train_project import ENV

from ajepa.config import load_params, parse_params
from ajepa.errors import ConfigError

# nine levels of nine aliases: 600 bytes standing for 9^9 (387 M) strings
BOMB = "lol:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _limited(code: str, cwd: Path, extra_mb: int = 768) -> subprocess.CompletedProcess:
    """Run `code` in a child whose heap cannot grow by more than `extra_mb` over what its imports took:
    an expansion of the bomb ends in a MemoryError there, not on the machine."""
    script = textwrap.dedent(f"""
        import resource
        import ajepa.cli, ajepa.tools.presets
        data = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (data + ({extra_mb} << 20), resource.RLIM_INFINITY))
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=120)


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and len(line) < 400, line[:2000]
    return line


@pytest.mark.slow
@pytest.mark.parametrize("where", ["params.yaml", "preset"])
def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, where):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text() + ("\n" + BOMB if where == "params.yaml" else ""))
    (tmp_path / "bomb.yaml").write_text(BOMB)
    command = ["--params", str(params), "report"] if where == "params.yaml" else \
        ["--params", str(params), "preset", str(tmp_path / "bomb.yaml")]
    r = _limited(f"import sys; sys.exit(ajepa.cli.main({command!r}))", tmp_path)
    line = _one_line(r)
    source = params if where == "params.yaml" else tmp_path / "bomb.yaml"
    assert f"{source}: not valid YAML" in line and "alias *a is not allowed" in line, line
    bomb_line = 3 if where == "preset" else len((REPO / "params.yaml").read_text().splitlines()) + 4
    assert f"line {bomb_line}" in line, line


@pytest.mark.slow
def test_a_duplicate_key_is_an_error_naming_it(tmp_path):
    text = (REPO / "params.yaml").read_text()
    assert "\n  num_mel_bins: 128\n" in text
    params = tmp_path / "params.yaml"
    params.write_text(text.replace("\n  num_mel_bins: 128\n", "\n  num_mel_bins: 128\n  num_mel_bins: 64\n", 1))
    with pytest.raises(ConfigError) as e:
        load_params(params)
    assert str(e.value).startswith(f"{params}: not valid YAML") and "duplicate key 'num_mel_bins'" in str(e.value)
    preset = tmp_path / "twice.yaml"
    preset.write_text("pretrain:\n  seed: 1\npretrain:\n  seed: 2\n")
    command = ["--params", str(params), "preset", str(preset)]
    r = _limited(f"import sys; sys.exit(ajepa.cli.main({command!r}))", tmp_path)
    assert "duplicate key 'pretrain'" in _one_line(r)


def _with(change) -> dict:
    p = copy.deepcopy(tiny_params())
    change(p)
    return p


@pytest.mark.parametrize("change, key, says", [
    (lambda p: p["pretrain"]["encoder"].update(depth=100000), "pretrain.encoder.depth", "more than 256 blocks"),
    (lambda p: p["pretrain"]["encoder"].update(embed_dim=65536, num_heads=16), "pretrain.encoder",
     "B weights, more than 2 B"),
    (lambda p: p["pretrain"]["predictor"].update(embed_dim=16384, num_heads=16), "pretrain.predictor",
     "B weights, more than 2 B"),
    (lambda p: p["features"].update(num_mel_bins=1024), "features.num_mel_bins",
     "534 of its mel filters cover no bin of the 512-point FFT"),
])
def test_parameters_beyond_sane_bounds_are_one_line(change, key, says):
    with pytest.raises(ConfigError) as e:
        parse_params(_with(change))
    message = str(e.value)
    assert "\n" not in message and f": {key}" in message and says in message, message


def test_the_default_and_every_preset_stay_within_the_bounds():
    parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    parse_params(tiny_params())


def test_a_stage_with_params_of_another_folder_creates_nothing_here(tmp_path, monkeypatch, capsys):
    from ajepa.cli import main
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--params", str(project / "params.yaml"), "linear", "synth"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"not under the current folder {elsewhere}" in err and f"cd {project}" in err, err
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_snakemake_unlock_needs_no_cores(tmp_path):
    from conftest import make_project_copy, run
    root = make_project_copy(tmp_path / "p", tiny_params())
    r = run(["snakemake", "--unlock"], root, check=False, timeout=300)
    assert r.returncode == 0 and "Unlocked working directory" in r.stdout + r.stderr, r.stderr[-2000:]
