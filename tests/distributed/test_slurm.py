"""`launch/slurm.sbatch` on a real single-host SLURM cluster: preempted mid-run, it requeues itself
and the requeued job continues the run with the uninterrupted run's losses, bitwise.

The cluster is built in a tmp folder (munged, slurmctld and slurmd in the foreground on free
ports, pointed at a tmp slurm.conf) and torn down after the test; nothing outside it is written.
Two SLURM tasks on the one node stand in for two nodes (torchrun --nnodes 2, one CPU rank each).
Without the daemons the test skips, except in CI (CI=true), where it fails.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import UNINTERRUPTED, UNINTERRUPTED_STEPS, training_losses

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI installs SLURM and munge, yet: {reason}")
    pytest.skip(reason)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


SLURM_CONF = """\
ClusterName=sparsetron-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.daemons: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        self.daemons.append(
            subprocess.Popen([name, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def call(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)

    def _job_processes(self) -> list[int]:
        marker = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        daemons = {proc.pid for proc in self.daemons}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        # Jobs first, while slurmd can still end them; then whatever of them is left (their
        # processes carry this cluster's SLURM_CONF), then the daemons.
        if self.daemons and self.daemons[-1].poll() is None:
            self.call("scancel", "--full", *self.call("squeue", "--noheader", "--format=%i").stdout.split())
            deadline = time.monotonic() + 20
            while self.call("squeue", "--noheader").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.daemons):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def slurm(tmp_path_factory):
    missing = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None]
    if missing:
        _unavailable(
            f"SLURM/munge not installed (no {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        _unavailable("the single-host SLURM cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)  # munged refuses folders others may write to
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _free_ports(2)
    cpus = max(2, os.cpu_count() or 1)
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(host=host, root=root, ctld_port=ctld_port, slurmd_port=slurmd_port, cpus=cpus)
    )
    cluster = Cluster(root)
    try:
        cluster.start(
            "munged",
            "--foreground",
            "--force",
            f"--socket={root}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        )
        cluster.start("slurmctld", "-D", "-i", "-f", str(root / "slurm.conf"))
        cluster.start("slurmd", "-D", "-f", str(root / "slurm.conf"))
        deadline = time.monotonic() + 30
        while True:
            dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
            if dead:
                _unavailable(f"{', '.join(dead)} exited at start:\n{cluster.logs()}")
            state = cluster.call("sinfo", "--noheader", "--format=%t", timeout=10)
            if state.returncode == 0 and state.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline:
                _unavailable(f"the node did not come up idle in 30 s ({state.stdout}{state.stderr}):\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()


STEPS = UNINTERRUPTED_STEPS
TRAIN = [*UNINTERRUPTED, "--set", "checkpoint.interval=0"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training step logged, in order."""
    return sorted((step, loss) for step, values in training_losses(run_dir).items() for loss in values)


def _job(cluster: Cluster, job: str) -> dict[str, str]:
    shown = cluster.call("scontrol", "show", "job", job).stdout.split()
    return dict(item.split("=", 1) for item in shown if "=" in item)


def _wait(what: str, check, timeout: float, cluster: Cluster, job: str):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        state = _job(cluster, job).get("JobState")
        assert time.monotonic() < deadline and state not in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
        ), f"waiting {timeout} s for {what}; job {job} is {state}\n{cluster.logs()}"
        time.sleep(0.2)
    return found


def test_preempted_job_requeues_and_resumes_bitwise(slurm, tmp_path, uninterrupted_losses):
    env = {
        **slurm.env,
        "OMP_NUM_THREADS": "1",
        "THP_MEM_ALLOC_ENABLE": "1",  # what the CLI would restart itself with, minus the restart
        "SPARSETRON_PYTHON": sys.executable,
        "SPARSETRON_RDZV_PORT": str(_free_ports(1)[0]),
        "SPARSETRON_SHUTDOWN_TIMEOUT": "30",
    }
    started = time.monotonic()
    expected = sorted(uninterrupted_losses.items())

    run_dir = tmp_path / "run"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", f"--output={tmp_path}/slurm-%j.out"]
        + [str(LAUNCH / "slurm.sbatch"), *TRAIN, "--set", f"trainer.run_dir={run_dir}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    # Preempt once training is under way: the ranks finish the step, save and exit, the job requeues.
    _wait("a first training step", lambda: _losses(run_dir), 90, slurm, job)
    signalled = time.monotonic()
    preempt = slurm.call("scancel", "--batch", "--signal=USR1", job)
    assert preempt.returncode == 0, preempt.stderr
    _wait("the requeue", lambda: _job(slurm, job).get("Restarts") == "1", 60, slurm, job)
    stopped_at = _losses(run_dir)[-1][0]
    assert stopped_at < STEPS, "the run ended before the preemption reached it"
    # SLURM holds a requeued job about two minutes (its BeginTime); a cluster would wait, the test
    # does not. Not at once, though: a start in the second of the requeue finds the job's
    # credential revoked (which is why SLURM holds it).
    held = _job(slurm, job)
    slurm.call("scontrol", "update", f"JobId={job}", "StartTime=now+2")
    _wait("the resumed run's first step", lambda: _losses(run_dir)[-1][0] > stopped_at, 90, slurm, job)
    resumed = time.monotonic()
    _wait("the job to end", lambda: _job(slurm, job).get("JobState") == "COMPLETED", 90, slurm, job)

    final = _job(slurm, job)
    assert final["Restarts"] == "1"  # requeued once, not again after finishing
    got = _losses(run_dir)
    assert [step for step, _ in got] == list(range(1, STEPS + 1))  # no step lost, none repeated
    assert got == expected  # bitwise: floats survive JSON exactly
    logs = run_dir / "logs"
    job_log = (logs / f"job_{job}.log").read_text()
    assert f"job {job} restart 0 (SLURM_RESTART_COUNT=unset)" in job_log
    assert f"job {job} restart 1 (SLURM_RESTART_COUNT=1)" in job_log
    assert "forwarded SIGUSR1 to the ranks" in job_log
    # The ranks saved and exited 0, and so did torchrun on both "nodes" (SIGUSR1 kills an unprepared one).
    assert job_log.count("torchrun exited with status 0") == 4
    assert f"stopped at step {stopped_at} of {STEPS} (status 0, signal SIGUSR1); requeueing job {job}" in job_log
    assert f"finished: checkpoint at step {STEPS} of {STEPS}" in job_log
    for restart in (0, 1):
        for task in (0, 1):
            rank_logs = list((logs / f"job_{job}_restart{restart}" / f"task{task}").glob("*/attempt_0/0/stderr.log"))
            assert len(rank_logs) == 1, (restart, task)
    first_rank0 = "".join(p.read_text() for p in logs.glob(f"job_{job}_restart1/task*/*/attempt_0/0/stdout.log"))
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in first_rank0
    print(
        f"\nSLURM test: whole test {time.monotonic() - started:.1f} s; "
        f"preempted after step {stopped_at}, signal to the first resumed step {resumed - signalled:.1f} s; "
        f"SLURM held the requeued job until {held.get('StartTime')} ({held.get('Reason')}), requeued at {held.get('SubmitTime')}"
    )
