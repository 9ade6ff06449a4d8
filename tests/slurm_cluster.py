"""A private single-node SLURM cluster for the tests, from Debian's packages, as root, without systemd.

    apt-get install --no-install-recommends slurm-wlm munge mariadb-server slurmdbd   # what it needs
    python tests/slurm_cluster.py start /tmp/slurm     # prints the SLURM_CONF line for sbatch, sacct, ...
    python tests/slurm_cluster.py stop /tmp/slurm

Everything lives in the state folder: the MUNGE key and socket, a MariaDB data directory on a free
port, slurmdbd (accounting, which snakemake-executor-plugin-slurm polls with `sacct`), slurmctld and
slurmd, their configuration, logs and spool. Each daemon runs in the foreground of its own session,
started here, and its PID (with its start time, against PID reuse) is recorded in `daemons.json` as
soon as it runs; `stop` ends exactly those processes and nothing else. Nothing outside the folder is
written: no /etc/slurm, no /run/munge, no system MariaDB. Starting from nothing takes about 15 s on a
2-core machine; restarting from an existing folder skips the database setup.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge", "mariadb-server", "slurmdbd")
CLIENTS = ("srun", "sbatch", "scancel", "squeue", "sacct", "sinfo", "scontrol", "sacctmgr")
PROGRAMS = ("munged", "munge", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            *CLIENTS)
CLUSTER = ACCOUNT = "ajepa"
DB_USER = DB_PASSWORD = "slurm"  # reachable only on 127.0.0.1, from this machine, for a throwaway database
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class Unavailable(RuntimeError):
    """This machine cannot run the cluster (the tests skip with the reason)."""


def unavailable() -> str | None:
    """Why the cluster cannot start here, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "a private SLURM cluster needs root on Linux (its daemons run as root, without systemd)"
    missing = [p for p in PROGRAMS if shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return (f"SLURM programs not installed ({', '.join(missing)}): apt-get install --no-install-recommends "
                f"{' '.join(PACKAGES)}")
    return None


def _program(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in "ZX" else fields[19]


class Cluster:
    """The cluster whose state lives in `state`; `start()` brings it up, `stop()` ends what it started."""

    def __init__(self, state: Path):
        self.state = Path(state).resolve()
        self.conf = self.state / "etc" / "slurm.conf"
        self.records = self.state / "daemons.json"
        self.children: dict[int, subprocess.Popen] = {}  # the daemons this process started (to reap them)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a SLURM command against this cluster (its jobs inherit it: --export=ALL)."""
        return {**os.environ, "SLURM_CONF": str(self.conf),
                "PATH": f"{self.state / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A client command (sbatch, sacct, sacctmgr, ...) against this cluster, with `env` added to its
        environment (and so to a job's)."""
        r = subprocess.run([_program(cmd[0]), *cmd[1:]], capture_output=True, text=True, check=False,
                           env={**self.env, **(env or {})},
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    # --- jobs ---------------------------------------------------------------------------------------

    def job_state(self, job_id: str) -> str:
        """The job's state in the accounting database ("" until slurmdbd has it)."""
        out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).stdout.split()
        return out[0].split()[0] if out else ""

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Wait for the job to end; its final state (COMPLETED, TIMEOUT, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(1)
        raise TimeoutError(f"SLURM job {job_id} still {self.job_state(job_id) or 'unknown'} after {timeout:.0f} s")

    # --- start ----------------------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Start munged, MariaDB, slurmdbd, slurmctld and slurmd; register the cluster and the account."""
        reason = unavailable()
        if reason:
            raise Unavailable(reason)
        if any(_start_time(r["pid"]) == r["start"] for r in self._read_records()):
            raise RuntimeError(f"{self.state}: a cluster from this folder is still running; stop it first")
        for sub in ("etc", "munge", "log", "ctld", "spool"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self._write_records([])
        try:
            ports = dict(zip(("slurmctld", "slurmd", "slurmdbd", "mariadb"), _free_ports(4)))
            self._write_config(ports)
            self._write_clients()
            self._start_munge()
            self._start_mariadb(ports["mariadb"])
            self._start_daemon("slurmdbd", ["slurmdbd", "-D"])
            self._wait("slurmdbd answers", lambda: self.run("sacctmgr", "-n", "show", "cluster", check=False)
                       .returncode == 0)
            self._register()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i"])
            self._start_daemon("slurmd", ["slurmd", "-D", "-N", self.node])
            self._wait(f"node {self.node} idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
                       .stdout.strip() == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self, ports: dict[str, int]) -> None:
        s, sock = self.state, self.state / "munge" / "munge.socket"
        mem_mb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal:"))) // 1024
        cpus = os.cpu_count() or 1
        lines = [
            f"ClusterName={CLUSTER}", f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ports['slurmctld']}", f"SlurmdPort={ports['slurmd']}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            # the MUNGE socket of connections to slurmdbd (sacct, sacctmgr, slurmctld): this one too
            f"AccountingStoragePass={sock}",
            f"StateSaveLocation={s / 'ctld'}", f"SlurmdSpoolDir={s / 'spool'}",
            f"SlurmctldPidFile={s / 'slurmctld.pid'}", f"SlurmdPidFile={s / 'slurmd.pid'}",
            f"SlurmctldLogFile={s / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={s / 'log' / 'slurmd.log'}",
            # no cgroup delegation without systemd: track a job's processes by their parents
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2", "SchedulerType=sched/backfill",
            # a job that asks no memory gets DefMemPerCPU per core, not the whole node
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=500",
            # the time limit is the limit (no grace); SIGKILL 30 s after SIGTERM (SLURM's default: time to save on
            # a loaded machine); finished jobs stay visible to the plugin's status queries
            "OverTimeLimit=0", "KillWait=30", "MinJobAge=600", "InactiveLimit=0",
            # sacct shows the comment, where snakemake-executor-plugin-slurm names the rule
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStoreFlags=job_comment",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={ports['slurmdbd']}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb * 9 // 10} State=UNKNOWN",
            "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        dbd = self.state / "etc" / "slurmdbd.conf"  # read beside slurm.conf; slurmdbd wants it private
        dbd.touch(mode=0o600)
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={sock}", "DbdHost=localhost", "DbdAddr=127.0.0.1",
            f"DbdPort={ports['slurmdbd']}", "SlurmUser=root", f"PidFile={s / 'slurmdbd.pid'}",
            f"LogFile={s / 'log' / 'slurmdbd.log'}", "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1", f"StoragePort={ports['mariadb']}", f"StorageUser={DB_USER}",
            f"StoragePass={DB_PASSWORD}", "StorageLoc=slurm_acct_db"]) + "\n")

    def _write_clients(self) -> None:
        """bin/ holds the client commands pinned to this cluster's slurm.conf. A real cluster keeps it in
        /etc/slurm; this one's lives in the state folder and reaches the clients through SLURM_CONF,
        which snakemake-executor-plugin-slurm removes (with every SLURM_ variable) before the job's srun."""
        folder = self.state / "bin"
        folder.mkdir(exist_ok=True)
        for name in CLIENTS:
            shim = folder / name
            shim.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {_program(name)} "$@"\n')
            shim.chmod(0o755)

    def _start_munge(self) -> None:
        folder = self.state / "munge"
        folder.chmod(0o755)
        key = folder / "munge.key"
        if not key.exists():
            key.touch(mode=0o400)
            key.write_bytes(os.urandom(1024))
        sock = folder / "munge.socket"
        # --force: munged refuses a socket that not every user can reach, and a test's temporary folder
        # is private to root; every client here runs as root
        self._start_daemon("munged", ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                                      f"--log-file={folder / 'munged.log'}", f"--pid-file={folder / 'munged.pid'}",
                                      f"--seed-file={folder / 'munged.seed'}"])
        self._wait("munged answers", lambda: subprocess.run(
            [_program("munge"), "-n", "-S", str(sock)], capture_output=True, check=False).returncode == 0)

    def _start_mariadb(self, port: int) -> None:
        db = self.state / "db"
        data, sock = db / "data", db / "mysqld.sock"
        if not data.exists():
            db.mkdir(exist_ok=True)
            tmp = db / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self._check([_program("mariadb-install-db"), "--no-defaults", f"--datadir={tmp}", "--user=root",
                         "--auth-root-authentication-method=socket", "--skip-test-db"], db / "install.log")
            tmp.rename(data)
        self._start_daemon("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                                        f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={db / 'mysqld.pid'}",
                                        f"--log-error={db / 'error.log'}", "--user=root", "--skip-name-resolve",
                                        "--innodb-buffer-pool-size=64M"])
        sql = (f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; "
               f"GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';")
        client = [_program("mariadb"), "--no-defaults", f"--socket={sock}", "-u", "root", "-e"]
        self._wait("MariaDB answers",
                   lambda: subprocess.run(client + ["SELECT 1"], capture_output=True, check=False).returncode == 0)
        self._check(client + [sql], db / "setup.log")

    def _register(self) -> None:
        """The cluster, an account, and root in it by default (the account the plugin finds for its jobs)."""
        if CLUSTER not in self.run("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster").stdout.split():
            self.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
        if ACCOUNT not in self.run("sacctmgr", "-n", "-P", "show", "account", "format=account").stdout.split():
            self.run("sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}", "Description=tests",
                     f"Organization={ACCOUNT}")
            self.run("sacctmgr", "-i", "add", "user", "root", f"Account={ACCOUNT}", f"Cluster={CLUSTER}")
            self.run("sacctmgr", "-i", "modify", "user", "root", "set", f"DefaultAccount={ACCOUNT}")

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        with open(self.state / "log" / f"{name}.out", "ab") as log:
            p = subprocess.Popen([_program(cmd[0]), *cmd[1:]], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.children[p.pid] = p
        start = None
        for _ in range(50):  # /proc/PID/stat can lag the fork by a moment
            start = _start_time(p.pid)
            if start is not None or p.poll() is not None:
                break
            time.sleep(0.02)
        self._write_records(self._read_records() + [{"name": name, "pid": p.pid, "start": start}])
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({p.returncode}): {self._tail(name)}")

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [r["name"] for r in self._read_records() if _start_time(r["pid"]) != r["start"]]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not after {timeout:.0f} s"
                raise RuntimeError(f"SLURM cluster in {self.state}: waiting for {what}: {why}\n" +
                                   "\n".join(self._tail(r["name"]) for r in self._read_records()))
            time.sleep(0.2)

    def _check(self, cmd: list[str], log: Path) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        log.write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}); see {log}:\n{r.stderr[-2000:]}")

    def _tail(self, name: str, lines: int = 15) -> str:
        logs = {"slurmdbd": "slurmdbd.log", "slurmctld": "slurmctld.log", "slurmd": "slurmd.log"}
        path = self.state / ("db/error.log" if name == "mariadbd" else f"log/{logs.get(name, name + '.out')}")
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
        return f"--- {path}\n" + "\n".join(text)

    # --- stop -----------------------------------------------------------------------------------------

    def _read_records(self) -> list[dict]:
        return json.loads(self.records.read_text()) if self.records.exists() else []

    def _write_records(self, records: list[dict]) -> None:
        tmp = self.records.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(self.records)

    def running(self) -> list[str]:
        """The recorded daemons still running (a zombie has stopped)."""
        return [r["name"] for r in self._read_records() if r["start"] and _start_time(r["pid"]) == r["start"]]

    def stop(self, timeout: float = 20) -> None:
        """Cancel the cluster's jobs, then SIGTERM each recorded daemon, last started first, and SIGKILL
        what is left after `timeout` seconds. Only the PIDs recorded here, and only while they are still
        the processes that were started (same start time)."""
        records = self._read_records()
        if "slurmctld" in self.running():
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for r in reversed(records):
                if r["start"] and _start_time(r["pid"]) == r["start"]:
                    os.kill(r["pid"], sig)
                    self._wait_gone(r, timeout)
        for p in self.children.values():  # reap the zombies of the daemons this process started
            p.poll()
        self.children.clear()

    def _wait_gone(self, record: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _start_time(record["pid"]) == record["start"] and time.monotonic() < deadline:
            child = self.children.get(record["pid"])
            if child is not None:
                child.poll()
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop STATE_FOLDER", file=sys.stderr)
        return 2
    cluster = Cluster(Path(argv[1]))
    if argv[0] == "start":
        t = time.monotonic()
        try:
            cluster.start()
        except Unavailable as e:
            print(f"slurm_cluster: {e}", file=sys.stderr)
            return 1
        print(f"# SLURM cluster up in {time.monotonic() - t:.0f} s; for sbatch, sacct, snakemake --executor slurm:")
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
        left = cluster.running()
        if left:
            print(f"slurm_cluster: still running: {', '.join(left)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
