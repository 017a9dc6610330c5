"""A real Slurm cluster on localhost for tests: munged + slurmctld + two slurmd nodes.

Debian's Slurm build allows several slurmd on one machine (MULTIPLE_SLURMD), so
nodes 127.0.0.1 and 127.0.0.2 (loopback names that resolve without /etc/hosts)
run side by side and a `--nodes=2` job really spans two slurmd daemons. All
state lives in one temporary folder; daemons are stopped by the PIDs in their
pidfiles, never by name.

    reason = slurm_unavailable()          # None, or why the tests must skip
    with SlurmCluster() as cluster:       # state in a fresh /tmp/cxr-slurm-* folder, removed after
        job, rc = cluster.sbatch(["--nodes=2", "script.sh"], env=..., cwd=...)
        cluster.job_info(job)["JobState"] == "COMPLETED"

Packages (slurmctld slurmd slurm-client munge) are installed with apt-get when
missing and we are root. Set CXR_REQUIRE_SLURM=1 (CI) to turn a skip into a failure,
CXR_KEEP_SLURM=1 to keep the state folder (daemon logs) after the cluster stops.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged"]
NODES = ["127.0.0.1", "127.0.0.2"]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def slurm_unavailable() -> str | None:
    """None when a cluster can be started here; otherwise the reason to skip."""
    if all(_which(b) for b in BINARIES):
        return None if os.geteuid() == 0 else "Slurm test cluster needs root (slurmd runs jobs as root here)"
    if os.geteuid() != 0:
        return "Slurm not installed and not root: cannot apt-get install slurmctld slurmd slurm-client munge"
    if not shutil.which("apt-get"):
        return "Slurm not installed and no apt-get to install it (Debian/Ubuntu only)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            tail = " ".join(p.stderr.split())[-200:]
            return f"could not install Slurm ({' '.join(cmd[:2])} failed: {tail})"
    missing = [b for b in BINARIES if not _which(b)]
    return f"Slurm installed but {', '.join(missing)} not found" if missing else None


def _free_port_block(n: int) -> int:
    """A base port with n consecutive free ports (slurmctld, then one per slurmd)."""
    for _ in range(50):
        base = random.randint(20000, 30000)
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports for the Slurm test cluster")


class SlurmCluster:
    def __init__(self, root: Path | None = None, cpus_per_node: int = 2):
        # munged insists every folder above its socket is world-executable, which
        # pytest's 0700 tmp folders are not: by default use a fresh folder in /tmp.
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="cxr-slurm-")) if root is None else Path(root)
        self.cpus = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.pidfiles: list[Path] = []

    # -- environment for client commands (sbatch, scontrol, sinfo)
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        return e

    def _run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        p = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        for d, mode in ((r, 0o711), (r / "munge", 0o700), (r / "sock", 0o755), (r / "state", 0o700),
                        (r / "spool", 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)                      # munged: key folder private, socket folder reachable
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "sock" / "munge.socket.2"
        munge_pid = r / "munge" / "munged.pid"
        self.pidfiles.append(munge_pid)
        subprocess.run([_which("munged"), f"--key-file={key}", f"--socket={sock}", f"--pid-file={munge_pid}",
                        f"--log-file={r / 'munge' / 'munged.log'}", f"--seed-file={r / 'munge' / 'munged.seed'}"],
                       check=True, capture_output=True, timeout=30)
        base = _free_port_block(1 + len(NODES))
        mem = max(500, _mem_mib() // (2 * len(NODES)))
        self.conf.write_text(_SLURM_CONF.format(
            dir=r, sock=sock, ctld_port=base, first=base + 1, last=base + len(NODES),
            nodes=f"127.0.0.[1-{len(NODES)}]", cpus=self.cpus, mem=mem))
        self.pidfiles.append(r / "slurmctld.pid")
        subprocess.run([_which("slurmctld"), "-f", str(self.conf)], env=self.env(), check=True,
                       capture_output=True, timeout=30)
        _wait_for(lambda: (r / "slurmctld.pid").is_file(), timeout, "slurmctld pidfile")
        for node in NODES:
            (r / "spool" / f"slurmd-{node}").mkdir(exist_ok=True)
            self.pidfiles.append(r / f"slurmd-{node}.pid")
            subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", node], env=self.env(),
                           check=True, capture_output=True, timeout=30)

        def all_idle() -> bool:
            states = self._run(_which("sinfo"), "-h", "-N", "-o", "%t", check=False).split()
            return len(states) == len(NODES) and all(s == "idle" for s in states)
        _wait_for(all_idle, timeout, "both slurmd nodes idle (see " + str(r) + "/*.log)")
        return self

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600,
               wait: bool = True) -> tuple[str, int]:
        """Submit with --parsable (and --wait); returns (job id, sbatch's exit code)."""
        p = subprocess.run([_which("sbatch"), "--parsable", *(["--wait"] if wait else []), *args],
                           env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
        job = p.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise RuntimeError(f"sbatch did not submit: {p.stderr.strip()}")
        return job, p.returncode

    def job_info(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (no accounting here: the record lives MinJobAge seconds)."""
        out = self._run(_which("scontrol"), "show", "job", "-o", job)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def scontrol(self, *args: str) -> str:
        return self._run(_which("scontrol"), *args)

    def scancel(self, job: str, *args: str) -> None:
        self._run(_which("scancel"), *args, job)

    def stop(self) -> None:
        if (self.root / "slurmctld.pid").is_file():
            self._run(_which("scancel"), "--full", "-u", "root", check=False, timeout=30)
        for pidfile in reversed(self.pidfiles):       # slurmd, slurmctld, then munged
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_for(lambda: not _alive(pid), 15, f"pid {pid} to exit", raise_=False)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self._own_root and os.environ.get("CXR_KEEP_SLURM") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_for(cond, timeout: float, what: str, raise_: bool = True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    if raise_:
        raise TimeoutError(f"timed out waiting for {what}")


def _mem_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


# Slurm 21.08+ options only (Ubuntu 22.04 ships 21.08, Debian 12 22.05).
_SLURM_CONF = """\
ClusterName=cxrtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire (default 120 s) before it starts again
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/slurmd-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
PropagateResourceLimits=NONE
EnforcePartLimits=ALL
ReturnToService=2
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName={nodes} NodeHostname=localhost Port=[{first}-{last}] CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
