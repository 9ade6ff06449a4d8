"""ajepa.device: one device decision for every stage; `cuda` without a usable GPU stops in one line that
says why. The machines without a GPU are real here: this one (no driver), and a stand-in libcuda.so.1
built by the test that reports an old or a current driver, which torch's own CUDA start then reads."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, load_repo_params

from ajepa.cli import main
from ajepa.device import pick_device
from ajepa.errors import AjepaError

BUILD_MAJOR = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def fake_driver(tmp_path, version: int):
    """A folder holding a libcuda.so.1 whose cuDriverGetVersion reports `version` (and nothing else)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in driver library")
    folder = tmp_path / f"driver{version}"
    folder.mkdir()
    (folder / "f.c").write_text(f"int cuDriverGetVersion(int *v) {{ *v = {version}; return 0; }}\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "f.c")], check=True)
    return folder


def pick(env_extra: dict, setting: str) -> subprocess.CompletedProcess:
    """pick_device(setting) in a fresh process (torch reads the driver once per process)."""
    code = f"from ajepa.device import pick_device\nprint(pick_device({setting!r}))"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


needs_cuda_build = pytest.mark.skipif(BUILD_MAJOR is None or torch.cuda.is_available(),
                                      reason="needs a CUDA build of torch on a machine without a GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine must have no usable GPU")
def test_cpu_and_auto_run_on_the_cpu_and_cuda_stops_in_one_line(capsys):
    assert pick_device("cpu") == pick_device("auto") == pick_device(None) == torch.device("cpu")
    assert capsys.readouterr().err == ""  # no driver at all: auto is quiet on a CPU machine
    with pytest.raises(AjepaError, match=r"^distributed.device = 'cuda' but CUDA cannot be used: ") as e:
        pick_device("cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(AjepaError, match=r"^--device banana: must be auto, cuda, cuda:N or cpu$"):
        pick_device("banana", key="--device")


@pytest.mark.slow
@needs_cuda_build
def test_no_driver_says_so(tmp_path):
    r = pick({}, "cuda")
    assert r.returncode != 0 and "no NVIDIA driver found (libcuda.so.1 does not load)" in r.stderr


@pytest.mark.slow
@needs_cuda_build
def test_an_old_driver_is_named_with_the_versions(tmp_path):
    old = fake_driver(tmp_path, (BUILD_MAJOR - 1) * 1000 + 20)
    r = pick({"LD_LIBRARY_PATH": str(old)}, "cuda")
    assert r.returncode != 0
    assert f"supports CUDA {BUILD_MAJOR - 1}.2, older than this torch" in r.stderr and "update the driver" in r.stderr
    auto = pick({"LD_LIBRARY_PATH": str(old)}, "auto")
    # a driver is there but unusable: auto runs on the CPU and says why, in one line on stderr
    assert auto.returncode == 0 and auto.stdout.strip() == "cpu"
    assert auto.stderr.count("\n") == 1 and "warning: distributed.device = 'auto' runs on the CPU" in auto.stderr


@pytest.mark.slow
@needs_cuda_build
def test_no_visible_device_names_cuda_visible_devices(tmp_path):
    current = fake_driver(tmp_path, BUILD_MAJOR * 1000)
    r = pick({"LD_LIBRARY_PATH": str(current), "CUDA_VISIBLE_DEVICES": ""}, "cuda")
    assert r.returncode != 0 and "CUDA_VISIBLE_DEVICES='' leaves this process no GPU" in r.stderr


def test_a_gpu_this_torch_has_no_kernels_for_is_refused(monkeypatch):
    """Say a V100 (compute capability 7.0) under a build for sm_75 and newer: CUDA starts, kernels would not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_100"])
    with pytest.raises(AjepaError, match=r"GPU 1 \(Tesla V100, compute capability 7.0\) is not among"):
        pick_device("cuda", local_rank=1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_80"])
    assert pick_device("cuda", local_rank=1) == pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(AjepaError, match=r"^LOCAL_RANK 2 but only 2 CUDA device\(s\)"):
        pick_device("auto", local_rank=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine must have no usable GPU")
@pytest.mark.parametrize("command", [["pretrain"], ["linear", "synth"], ["finetune", "synth"]])
def test_every_computing_stage_stops_before_any_work(command, tmp_path, monkeypatch, capsys):
    p = load_repo_params()
    p["distributed"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ajepa {command[0]}: error: distributed.device = 'cuda' but CUDA cannot be used: ")
    assert err.count("\n") == 1 and sorted(f.name for f in tmp_path.iterdir()) == ["params.yaml"]


def test_the_paper_preset_insists_on_cuda_and_the_default_does_not():
    assert yaml.safe_load((REPO / "presets/paper.yaml").read_text())["distributed"]["device"] == "cuda"
    assert load_repo_params()["distributed"]["device"] in ("auto", "cpu")
