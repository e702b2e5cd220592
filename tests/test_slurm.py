"""tools/slurm without Slurm: the scripts parse, the per-node launch commands agree across nodes,
and USR2 near the time limit leads to STOP file → clean exit → requeue."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "tools" / "slurm"
SCRIPTS = ["train.sbatch", "train_single_node.sbatch", "launch.sh"]
BASH = shutil.which("bash")


def flags(command: str) -> dict[str, str]:
    """{'--flag': value} of an accelerate command line (valueless flags map to '')."""
    args = shlex.split(command)
    out = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else ""
            out[arg] = "" if nxt.startswith("-") else nxt
    return out


def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)
    return folder


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    subprocess.run([BASH, "-n", str(SLURM / name)], check=True)


def dry_run(env: dict, path: str) -> str:
    out = subprocess.run(
        [BASH, str(SLURM / "launch.sh")],
        env={"PATH": path, "QUEST_DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return out.stdout.strip()


def two_nodes(tmp_path: Path, path: str) -> list[dict[str, str]]:
    commands = []
    for node in ("0", "1"):
        env = {
            "SLURM_NODEID": node,
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "4242",
            "SLURM_GPUS_ON_NODE": "4",
            "SLURM_NNODES": "2",
            "RECIPE": "recipes/imagenet_rn34_rn18.toml",
            "OVERRIDES": "seed=1 optim.epochs=2",
        }
        command = dry_run(env, path)
        assert command.startswith("accelerate launch --multi_gpu ")
        assert command.endswith(
            " -m quest.train recipes/imagenet_rn34_rn18.toml seed=1 optim.epochs=2"
        )
        commands.append(flags(command))
    return commands


def test_dry_run_two_nodes_without_scontrol(tmp_path):
    # An empty PATH: no scontrol, so launch.sh expands gpu[07-08] itself (with bash builtins only).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    first, second = two_nodes(tmp_path, str(bin_dir))
    assert (first["--machine_rank"], second["--machine_rank"]) == ("0", "1")
    for f in (first, second):
        assert f["--main_process_ip"] == "gpu07"
        assert f["--num_processes"] == "8" and f["--num_machines"] == "2"
        assert f["--rdzv_backend"] == "c10d"
    assert first["--main_process_port"] == second["--main_process_port"] == "24242"


def test_dry_run_uses_scontrol_when_present(tmp_path):
    log = tmp_path / "scontrol.log"
    bin_dir = fake_bin(
        tmp_path, "scontrol", f'echo "$*" >> {log}\nprintf "nodeB\\nnodeA\\n"\n'
    )  # scontrol's order wins, not a sort
    first, second = two_nodes(tmp_path, f"{bin_dir}:{os.environ['PATH']}")
    assert first["--main_process_ip"] == second["--main_process_ip"] == "nodeB"
    assert log.read_text().splitlines() == ["show hostnames gpu[07-08]"] * 2


def test_nodelist_fallback_parser():
    script = (SLURM / "launch.sh").read_text()
    function = re.search(r"^expand_nodelist\(\) \{.*?^\}$", script, re.S | re.M).group(0)
    out = subprocess.run(
        [BASH, "-c", f'{function}\nexpand_nodelist "$1"', "x", "gpu[01,03-04],cpu7,n[9-10]-ib"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["gpu01", "gpu03", "gpu04", "cpu7", "n9-ib", "n10-ib"]


def test_single_process_has_no_distributed_flags(tmp_path):
    command = dry_run(
        {"RECIPE": "r.toml", "GPUS_PER_NODE": "1", "RUN_DIR": "runs/x"}, "/usr/bin:/bin"
    )
    assert command == "accelerate launch --num_processes 1 -m quest.train r.toml run.dir=runs/x"


# ----------------------------------------------------------------------------- preemption


def scontrol_recorder(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "scontrol.log"
    bin_dir = fake_bin(
        tmp_path,
        "scontrol",
        f'if [[ $1 == show ]]; then printf "gpu07\\ngpu08\\n"; exit 0; fi\necho "$*" >> {log}\n',
    )
    return bin_dir, log


def test_usr2_trap_touches_stop_and_requeues(tmp_path):
    """The trap function of train.sbatch, run on its own with a fake scontrol."""
    text = (SLURM / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    assert re.search(r"^#SBATCH --signal=B:USR2@300$", text, re.M)
    assert re.search(r"^trap on_usr2 USR2$", text, re.M)
    function = re.search(r"^on_usr2\(\) \{.*?^\}$", text, re.S | re.M).group(0)
    bin_dir, log = scontrol_recorder(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = subprocess.run(
        [BASH, "-c", f"{function}\non_usr2"],
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "RUN_DIR": str(run_dir),
            "SLURM_JOB_ID": "4242",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / "STOP").is_file()
    assert log.read_text().splitlines() == ["requeue 4242"]


FAKE_SRUN = """
printf '%s\\n' "$@" > "$LOG_DIR/srun_args"
[[ -e $RUN_DIR/STOP ]] && touch "$LOG_DIR/stale_stop"
for ((node = 0; node < SLURM_NNODES; node++)); do  # each task, as Slurm would start it
    SLURM_NODEID=$node QUEST_DRY_RUN=1 bash -c "${@: -1}" >> "$LOG_DIR/launch_commands"
done
touch "$LOG_DIR/started"
for ((i = 0; i < 300; i++)); do  # the trainer: polls STOP, saves, deletes STOP, exits 0
    if [[ -e $RUN_DIR/STOP ]]; then
        rm "$RUN_DIR/STOP"
        touch "$LOG_DIR/saved"
        exit 0
    fi
    sleep 0.1
done
exit 3
"""


def run_batch(tmp_path: Path, script: str, nodes: int, srun: str, signal_after: str) -> str:
    """Run the whole batch script with fake srun/scontrol; send USR2 once the fake srun has created
    logs/<signal_after>. Returns the script's output (its exit status must be 0)."""
    bin_dir, _ = scontrol_recorder(tmp_path)
    fake_bin(tmp_path, "srun", srun)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    recipe = tmp_path / "recipe.toml"  # RUN_DIR unset: taken from the recipe's run.dir
    recipe.write_text(
        f'[run]\ndir = "{run_dir}"\n[student]\narch = "resnet8"\n[distill]\nmethod = "none"\n'
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "LOG_DIR": str(logs),
        "RECIPE": str(recipe),
        "QUEST_ROOT": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]" if nodes == 2 else "gpu07",
        "SLURM_NNODES": str(nodes),
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "16",
    }
    env.pop("RUN_DIR", None)
    proc = subprocess.Popen(
        [BASH, str(SLURM / script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not (logs / signal_after).exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, f"the fake srun never wrote {signal_after}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    return output


@pytest.mark.parametrize("script,nodes", [("train.sbatch", 2), ("train_single_node.sbatch", 1)])
def test_time_limit_signal_checkpoints_then_requeues(tmp_path, script, nodes):
    """The whole batch script with fake srun/scontrol: USR2 → STOP → the 'trainer' exits → requeue."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # left behind by a killed job: must not stop the new one
    (run_dir / "summary.json").write_text("{}")  # an earlier run's: this one has not finished
    run_batch(tmp_path, script, nodes, FAKE_SRUN, signal_after="started")
    log = tmp_path / "scontrol.log"
    assert not (logs / "stale_stop").exists()
    assert (logs / "saved").exists() and not (run_dir / "STOP").exists()
    assert log.read_text().splitlines() == ["requeue 4242"]

    srun_args = (logs / "srun_args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in srun_args and "--ntasks-per-node=1" in srun_args
    assert f"--nodes={nodes}" in srun_args
    assert "$SLURM_NODEID" in srun_args[-1]  # expanded inside each task, not by the batch shell
    commands = [flags(c) for c in (logs / "launch_commands").read_text().splitlines()]
    assert [c["--machine_rank"] for c in commands] == [str(n) for n in range(nodes)]
    for c in commands:
        assert c["--num_processes"] == str(4 * nodes) and c["--num_machines"] == str(nodes)
        assert c["--main_process_ip"] == "gpu07" and c["--main_process_port"] == "24242"
    assert f"run.dir={run_dir}" in (logs / "launch_commands").read_text()


FAKE_SRUN_FINISHING = """
touch "$LOG_DIR/started"
# The trainer has passed its last STOP check: it completes the run and writes summary.json
# (atomically), then shuts down (W&B, process group) while USR2 arrives; it never looks at STOP again.
echo '{"top1": 71.0}' > "$RUN_DIR/.summary.json.tmp"
mv "$RUN_DIR/.summary.json.tmp" "$RUN_DIR/summary.json"
touch "$LOG_DIR/finished"
for ((i = 0; i < 300; i++)); do  # exit only once the trap has run (it touches STOP)
    [[ -e $RUN_DIR/STOP ]] && exit 0
    sleep 0.1
done
exit 3
"""


@pytest.mark.parametrize("script,nodes", [("train.sbatch", 2), ("train_single_node.sbatch", 1)])
def test_usr2_after_the_run_finished_does_not_requeue(tmp_path, script, nodes):
    """USR2 after the trainer's last STOP check: the run completes (a new summary.json), so the job
    ends without `scontrol requeue` and leaves no STOP file behind for a later run."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")  # an earlier run's, replaced by this one's
    output = run_batch(tmp_path, script, nodes, FAKE_SRUN_FINISHING, signal_after="finished")
    assert "USR2" in output  # the trap ran
    assert not (tmp_path / "scontrol.log").exists(), output  # no requeue (nor any other call)
    assert not (run_dir / "STOP").exists()
    assert "top1" in (run_dir / "summary.json").read_text()
