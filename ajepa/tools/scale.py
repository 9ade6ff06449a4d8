"""`ajepa bench scale`: AudioSet-2M's shape at a laptop's cost, run as a cluster job would run it.

AudioSet-2M is about 2 M clips in about 1,950 feature shards of 1,024 clips. What breaks first at that
shape is rarely the arithmetic: it is a descriptor per shard, a table held whole in memory, a file
written outside the job's folders. The rehearsal keeps the shape that causes those (the shard count,
every stage, pretraining in two processes with loader workers) and shrinks what only costs time: one
one-second clip per shard, a two-block encoder, one epoch. Each stage runs as its own `ajepa` process
under the job's limits (RLIMIT_NOFILE, RLIMIT_AS, HOME and TMPDIR inside the run folder, and, where
`unshare` may make a mount namespace, every mount but the run folder read-only) and is measured from
outside: seconds, the peak RSS of its largest process (the kernel's high-water mark), the RSS of its
whole process tree and the most descriptors any one of its processes held (both polled from /proc).
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ajepa.config import parse_params, read_yaml
from ajepa.errors import AjepaError
from ajepa.tools.presets import merge

AS2M_CLIPS, AS2M_SHARDS = 2_000_000, 1_950
SYNTH_CLASSES, LABELED_PER_CLASS = 12, 5  # the labeled part: 60 clips, the probes' and fine-tuning's input
POLL_S = 0.02


def rehearsal_params(base: dict, clips: int) -> dict:
    """`base` (a params.yaml) cut to the rehearsal: the synth dataset alone, one clip per shard, `clips`
    shards in all, the smallest model and one epoch everywhere; pretraining in 2 gloo processes with a
    loader worker each (the descriptors of a real run: workers, pipes, shared memory)."""
    pool = clips - SYNTH_CLASSES * LABELED_PER_CLASS
    if pool < 32:
        raise AjepaError(f"--clips {clips}: at least {SYNTH_CLASSES * LABELED_PER_CLASS + 32} (60 labeled + a pool)")
    small = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    merge(base, {
        "pipeline": {"datasets": ["synth"], "benchmarks": ["synth"]},
        "datasets": {"synth": {"prepare": {"pool_clips": pool, "clips_per_class": LABELED_PER_CLASS,
                                           "duration_s": 1.0}, "target_length": 96}},
        "features": {"shard_clips": 1, "num_workers": 2},
        "pretrain": {"datasets": ["synth"], "encoder": small, "predictor": {**small, "depth": 1},
                     "optim": {"epochs": 1, "batch_size": 128}, "checkpoint_every": 8, "log_every": 4,
                     "num_workers": 1, "probe": {"every": 0}},
        "linear": {"max_iter": 10, "attentive": {"epochs": 0}},
        "finetune": {"synth": {"epochs": 1, "batch_size": 16, "runs": 1, "random_init_baseline": False}},
        "distributed": {"device": "cpu", "processes": 2, "backend": "gloo"},
    }, source="the scale rehearsal")
    parse_params(base, "the scale rehearsal's params")  # the merged values pass the stages' own checks
    return base


STAGES = (("check", ["check"]), ("prepare", ["prepare", "synth"]), ("features", ["features", "synth"]),
          ("pool", ["pool", "synth"]), ("pretrain", ["pretrain"]), ("linear", ["linear", "synth"]),
          ("finetune", ["finetune", "synth"]), ("report", ["report"]))


@dataclass
class StageFigures:
    stage: str
    seconds: float
    peak_rss_mb: float  # the largest single process at its peak (VmHWM, polled)
    tree_rss_mb: float  # the whole process tree at its largest (polled)
    peak_open_files: int  # the most descriptors one process of the tree held (polled)
    processes: int  # the most processes alive at once in the tree


@dataclass(frozen=True)
class Limits:
    nofile: int
    memory_gb: float
    readonly: bool  # every mount but the run folder read-only (a mount namespace), where unshare may


class TreeSampler(threading.Thread):
    """Polls a process and its descendants: the largest one's peak RSS (VmHWM: the kernel's own high-water
    mark since exec, so no spike between two polls is missed), the tree's total RSS, the most descriptors
    one process holds, how many processes run at once."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.stop = pid, threading.Event()
        self.hwm = self.rss = self.fds = self.procs = 0

    def run(self) -> None:
        while not self.stop.is_set():
            tree = process_tree(self.root)
            rss = 0
            for pid in tree:
                try:  # a process may end between the listing and the reads
                    status = _status_kib(pid)
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                except (OSError, ValueError):
                    continue
                rss += status.get("VmRSS", 0) * 1024
                self.hwm = max(self.hwm, status.get("VmHWM", 0) * 1024)
                self.fds = max(self.fds, fds)
            self.rss, self.procs = max(self.rss, rss), max(self.procs, len(tree))
            time.sleep(POLL_S)


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it, from each process's parent in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:  # the name (field 2) may hold spaces and parentheses: the parent follows the last ')'
                ppid = int(Path(entry.path, "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _status_kib(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/status (VmRSS, VmHWM, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[key] = int(value.split()[0])
    return out


@contextlib.contextmanager
def short_tmpdir(run_dir: Path):
    """run_dir/tmp, by a short name: multiprocessing binds sockets there (a loader worker passing a batch
    by descriptor), and a socket's path must fit 107 bytes. A cluster's $TMPDIR is short; a run folder
    deep in a tree is not, so a long one is reached through a link in the system's temp folder."""
    tmp = run_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    if len(str(tmp)) <= 48:
        yield tmp
        return
    link = Path(tempfile.mkdtemp(prefix="ajepa-scale-")) / "tmp"
    link.symlink_to(tmp)
    try:
        yield link
    finally:
        shutil.rmtree(link.parent)


def _job_environment(run_dir: Path, tmp: Path) -> dict:
    """The stage's environment: every place a library writes by default (home, temp, caches) inside
    the run folder, no bytecode written next to the installed package."""
    home = run_dir / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"), "MPLCONFIGDIR": str(home / ".mpl"),
            "TORCH_HOME": str(home / ".torch"), "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def _set_limits(limits: Limits):
    def apply() -> None:  # in the child, before exec: inherited by every process the stage starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
        cap = int(limits.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return apply


def readonly_supported() -> bool:
    """Whether this process may make a mount namespace (root, or a kernel that lets users map root)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


def _command(args: list[str], run_dir: Path, readonly: bool) -> list[str]:
    ajepa = [sys.executable, "-m", "ajepa.cli", *args]
    if not readonly:
        return ajepa
    # the run folder bound onto itself keeps it writable when the root mount turns read-only (the cd
    # enters the new mount: the inherited working folder is the read-only one); /dev/shm (the loader's
    # shared memory) is its own mount and stays as it is, as on a cluster node
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro / && cd "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(run_dir), *ajepa]


def run_stage(name: str, args: list[str], run_dir: Path, limits: Limits, log, tmp: Path | None = None) -> StageFigures:
    """One stage as its own process under `limits`, measured; its output appended to `log`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(args, run_dir, limits.readonly), cwd=run_dir,
                            env=_job_environment(run_dir, tmp or run_dir / "tmp"), stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=_set_limits(limits))
    sampler = TreeSampler(proc.pid)
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        log.flush()
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise AjepaError(f"bench scale: stage {name} failed (exit {proc.returncode}) under {limits.nofile} open files "
                         f"and {limits.memory_gb:g} GiB: {tail[0]} (whole log: {log.name})")
    return StageFigures(name, round(seconds, 2), round(sampler.hwm / 2**20, 1), round(sampler.rss / 2**20, 1),
                        sampler.fds, sampler.procs)


def rehearse(base: dict, clips: int, limits: Limits, run_dir: Path) -> list[StageFigures]:
    """Every stage in order over a fresh rehearsal project in `run_dir`; stops at the first that fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(rehearsal_params(base, clips), sort_keys=False))
    figures = []
    with open(run_dir / "stages.log", "w") as log, short_tmpdir(run_dir) as tmp:
        for name, args in STAGES:
            log.write(f"==> ajepa {' '.join(args)}\n")
            log.flush()
            figures.append(run_stage(name, args, run_dir, limits, log, tmp))
    shards = len(list((run_dir / "data" / "features" / "synth").glob("shard-*.npy")))
    if shards != clips:
        raise AjepaError(f"bench scale: {shards} feature shards in {run_dir}, expected {clips}")
    return figures


# the stages whose input grows with the rehearsal's size; the probes, fine-tuning and the report read the 60
# labeled clips (or their results) at every size, so the rehearsal says nothing of their cost at AS-2M's
GROWING = ("prepare", "features", "pool", "pretrain")
NOISE = 0.05  # growth below this fraction between the sizes is read as none (the polls' and the machine's noise)


def project(runs: dict[int, list[StageFigures]], target: int = AS2M_CLIPS) -> dict:
    """Each growing stage's figures at `target` clips (the model: `MODEL`)."""
    sizes = sorted(runs)
    out = {}
    for i, f in enumerate(runs[sizes[-1]]):
        if f.stage not in GROWING:
            continue
        points = [(n, runs[n][i]) for n in sizes]
        if len(points) == 1:
            out[f.stage] = {"seconds": round(f.seconds * target / sizes[0])}
            continue
        out[f.stage] = {key: round(_line_at([n for n, _ in points], [getattr(g, key) for _, g in points], target), 1)
                        for key in ("seconds", "peak_rss_mb", "tree_rss_mb")}
        out[f.stage]["peak_open_files"] = f.peak_open_files
    return out


def _line_at(xs: list[float], ys: list[float], x: float) -> float:
    """The least-squares line through (xs, ys) at x; a line that grows by less than NOISE from the smallest
    size to the largest is read as no growth (the figure at the largest size): at these sizes a figure's
    fixed part dominates, and noise tilts a flat line either way."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    last = ys[xs.index(max(xs))]
    if slope * (max(xs) - min(xs)) <= NOISE * last:
        return last
    return my + slope * (x - mx)


def bench_scale(params_file: str, sizes: list[int], nofile: int, memory_gb: float, readonly: str,
                folder: str | None = None) -> dict:
    """The rehearsal at each size in `sizes` (shards = clips) under the given limits, and the projection."""
    base = read_yaml(Path(params_file).read_text(), params_file)
    use_ro = readonly == "on" or (readonly == "auto" and readonly_supported())
    if readonly == "on" and not readonly_supported():
        raise AjepaError("bench scale --readonly on: cannot make a mount namespace here (`unshare --mount` failed)")
    limits = Limits(nofile, memory_gb, use_ro)
    root = Path(folder).resolve() if folder else Path(tempfile.mkdtemp(prefix="ajepa-scale-"))
    runs = {}
    try:
        for n in sorted(set(sizes)):
            run_dir = root / f"clips-{n}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            runs[n] = rehearse(copy.deepcopy(base), n, limits, run_dir)
    finally:
        if not folder:
            shutil.rmtree(root, ignore_errors=True)
    return {"limits": {**asdict(limits), "home_tmpdir": "inside the run folder",
                       "write_outside": "refused (read-only mount namespace; /dev/shm stays writable)" if use_ro
                       else "not enforced (HOME and TMPDIR inside the run folder)"},
            "folder": str(root) if folder else None, "clips_per_shard": 1, "cpus": os.cpu_count(),
            "runs": {str(n): [asdict(f) for f in figs] for n, figs in runs.items()},
            "projection": {"clips": AS2M_CLIPS, "shards": AS2M_SHARDS, "model": MODEL, **project(runs)},
            "fraction_of_as2m": {str(n): round(n / AS2M_CLIPS, 6) for n in runs}}


MODEL = ("the stages whose input grows with the size (prepare, features, pool, pretrain); seconds and RSS: a "
         "least-squares line in the clip count through the sizes run, flat when it grows by less than 5% across them, "
         "at the rehearsal's 96 frames per clip and 2-block model (the pipeline's cost per clip, not the paper "
         "model's compute: docs/compute.md); one size: seconds in proportion to clips only. Open files: as measured "
         "at the largest size, which has AS-2M's shard count (the readers keep a bounded number open)")


def format_scale(r: dict) -> str:
    lim = r["limits"]
    lines = [f"scale rehearsal: 1 clip per shard, limits: {lim['nofile']} open files, {lim['memory_gb']:g} GiB "
             f"address space, writes outside the run folder {lim['write_outside']}; {r['cpus']} CPUs"]
    head = f"{'stage':<10}{'seconds':>9}{'peak RSS MB':>13}{'tree RSS MB':>13}{'open files':>12}{'procs':>7}"
    for n, figs in r["runs"].items():
        lines += ["", f"{n} clips in {n} shards ({float(r['fraction_of_as2m'][n]):.3%} of AS-2M's clips, "
                      f"{int(n) / AS2M_SHARDS:.0%} of its shards)", head]
        lines += [f"{f['stage']:<10}{f['seconds']:>9.1f}{f['peak_rss_mb']:>13.0f}{f['tree_rss_mb']:>13.0f}"
                  f"{f['peak_open_files']:>12}{f['processes']:>7}" for f in figs]
    p = r["projection"]
    lines += ["", f"projected to {p['clips']:,} clips in {p['shards']:,} shards", head]
    for stage, v in p.items():
        if isinstance(v, dict):
            cells = [v.get(k) for k in ("seconds", "peak_rss_mb", "tree_rss_mb", "peak_open_files")]
            lines.append(f"{stage:<10}" + "".join(f"{'-' if c is None else f'{c:.0f}':>{w}}"
                                                  for c, w in zip(cells, (9, 13, 13, 12))))
    return "\n".join([*lines, f"model: {p['model']}"])
