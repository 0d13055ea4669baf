"""A real single-node Slurm cluster on this machine, for testing the launchers (DESIGN §2).

Debian's slurm-wlm (slurmctld, slurmd, the client commands) and munge, started as root with all
state under one directory and stopped by PID. The configuration is tuned for tests: no
accounting, process tracking without cgroups, and a 2-second scheduler so that a requeued job
restarts within seconds instead of minutes.

``tools/setup_env.sh`` installs the packages when it runs as root with apt; ``missing()`` says
why a cluster cannot start here (the Slurm tests skip with that reason).

    with LocalSlurm(tmp_dir) as slurm:
        job = slurm.sbatch(["--ntasks=2", "job.sh"])
        slurm.wait_until_gone(job, timeout_s=120)
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "munged",
           "mungekey")


def missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    absent = [name for name in DAEMONS if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return (f"Slurm/munge not installed ({', '.join(absent)} missing): run tools/setup_env.sh "
                "as root with apt-get, or apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as the submitting user)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """One controller and one compute node (this host, all its CPUs) under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        # munged runs as user munge and must reach its key and socket: a directory of its own
        # directly under /tmp, since ``root`` may sit below a private (0700) directory
        self.munge_dir = Path(tempfile.mkdtemp(prefix="finevit-munge-", dir="/tmp"))
        self._procs: list[subprocess.Popen] = []

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        env = self.env()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / "log" / f"{daemon}.out", "w")
            self._procs.append(subprocess.Popen([_binary(daemon), "-D", "-f", str(self.conf)],
                                                env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return
            if any(p.poll() is not None for p in self._procs):
                break
            time.sleep(0.5)
        logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}"
                         for f in sorted((self.root / "log").glob("*")))
        self.stop()
        raise RuntimeError(f"local Slurm did not become idle within {timeout_s:.0f} s:\n{logs}")

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        pid_file = self.munge_dir / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _start_munge(self) -> None:
        """munged as user munge (it refuses root), key and socket under ``root/munge``; the
        socket directory must be traversable by every user (mode 0755)."""
        munge_dir = self.munge_dir
        key = munge_dir / "munge.key"
        if not key.exists():
            subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True,
                           capture_output=True)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        munge_dir.chmod(0o755)
        key.chmod(0o600)
        started = subprocess.run(
            ["runuser", "-u", "munge", "--", _binary("munged"), f"--key-file={key}",
             f"--socket={self.munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
             "--force"], capture_output=True, text=True)
        if started.returncode:
            raise RuntimeError(f"munged did not start: {started.stderr.strip()}")

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def _write_conf(self) -> None:
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        r = self.root
        self.conf.write_text(f"""\
ClusterName=finevit-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=4
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(total_mb * 0.95)} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    # --- clients ------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, args: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=kwargs.pop("env", self.env()), capture_output=True,
                              text=True, check=check, **kwargs)

    def sbatch(self, args: list[str], **kwargs) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], **kwargs).stdout.strip()
        return int(out.split(";")[0])

    def job_state(self, job_id: int) -> str | None:
        """The job's state (PENDING, RUNNING, ...), None once it has left the queue."""
        out = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False).stdout.strip()
        return out or None

    def wait_until_gone(self, job_id: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.job_state(job_id) is not None:
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                raise TimeoutError(f"job {job_id} still queued or running after {timeout_s:.0f} s")
            time.sleep(1.0)
