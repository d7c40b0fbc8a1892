"""`ray job submit` against a real Ray cluster: `ray start --head` in a subprocess, the batch-generation job
submitted with the `ray` CLI exactly as the README shows, its completions compared with the single-process model.

The cluster is private to this test: its own temp dir (so `ray.init()` in this pytest process, the suite's
`ray_cluster` fixture, never finds it), ports picked free, RAY_ADDRESS removed from its environment, token
authentication off (its default depends on whether ~/.ray/auth_token exists, i.e. on what ran before).

It is stopped by the id of the `ray start --block` process that owns it, not with `ray stop`: `ray stop` kills
every Ray process on the machine by name, including this suite's in-process cluster and anyone else's.
`ray start --block` stops the processes it started when it gets SIGTERM (and the kernel ends them if it dies);
whatever is left in its process group is killed with the group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from api_fakes import free_port
from ray.job_submission import JobStatus, JobSubmissionClient

from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.model.generate import greedy_generate
from dsv4.model.numerics import Numerics

BIN = Path(sys.executable).parent          # the venv whose `ray` and `dsv4` the cluster runs
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600                        # against hangs only; nothing asserts on speed
STOP_TIMEOUT_S = 60


@dataclass
class RayHead:
    process: subprocess.Popen
    dashboard: str                         # http://127.0.0.1:PORT: the job API
    env: dict[str, str]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def ray(self, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def job_status(self, submission_id: str) -> JobStatus:
        # The job API over HTTP: unlike `ray.init`, it does not touch this process's own Ray cluster.
        return JobSubmissionClient(self.dashboard).get_job_status(submission_id)


def cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",   # jobs run `dsv4` from this venv
            "RAY_AUTH_MODE": "disabled",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",         # SIGTERM stops at once, no node drain
            "RAY_USAGE_STATS_ENABLED": "0"}


def wait_for_dashboard(head: RayHead) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{head.log_tail()}")
        try:
            with urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the Ray dashboard did not answer within {START_TIMEOUT_S} s:\n{head.log_tail()}")


def stop(head: RayHead) -> None:
    """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to its process group."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.process.pid, signal.SIGKILL)   # the group this test created (start_new_session)
    except ProcessLookupError:
        pass
    head.process.wait(STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    temp_dir = Path(tempfile.mkdtemp(prefix="dsv4-ray-", dir="/tmp"))   # short: Ray's socket paths must fit
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "node-manager-port", "object-manager-port", "metrics-export-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port")}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp_dir),
               "--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--num-gpus", "0",   # 2 workers + driver
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
               "--min-worker-port", "0", "--max-worker-port", "0",                         # workers: any free port
               *(f"--{name}={port}" for name, port in ports.items())]
    env = cluster_env()
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(process, f"http://127.0.0.1:{ports['dashboard-port']}", env, log)
    try:
        wait_for_dashboard(head)
        yield head
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def submission_id(ray_head: RayHead) -> Iterator[str]:
    """A job id; a job still running when the test ends (it failed or hung) is stopped with `ray job stop`."""
    job = f"dsv4-batch-{os.getpid()}-{time.monotonic_ns()}"
    yield job
    try:
        running = not ray_head.job_status(job).is_terminal()
    except RuntimeError:   # never submitted
        running = False
    if running:
        ray_head.ray("job", "stop", "--address", ray_head.dashboard, job, timeout=120)


def test_a_batch_job_submitted_with_ray_job_submit_equals_the_model(ray_head, submission_id, tiny_checkpoint,
                                                                    tiny_model, tmp_path):
    g = torch.Generator().manual_seed(21)
    records = [{"id": "greeting", "prompt": "Hello from a Ray job", "max_tokens": 6},
               {"id": 2, "prompt_token_ids": torch.randint(2, 1024, (40,), generator=g).tolist(), "max_tokens": 5},
               {"id": "three", "prompt_token_ids": torch.randint(2, 1024, (130,), generator=g).tolist(),
                "max_tokens": 4}]
    records = [{**r, "temperature": 0, "ignore_eos": True} for r in records]
    working_dir = tmp_path / "job"                # what --working-dir uploads: the prompts and nothing else
    working_dir.mkdir()
    (working_dir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "completions.jsonl"       # absolute: the job's own directory is a copy that Ray owns

    submit = ray_head.ray(
        "job", "submit", "--address", ray_head.dashboard, "--submission-id", submission_id,
        "--working-dir", str(working_dir), "--",
        "dsv4", "batch", "--input", "prompts.jsonl", "--output", str(output), "--model", str(tiny_checkpoint),
        "--device", "cpu", "--workers", "2", "--max-model-len", "512", "--kv-cache-gib", "0.0625")
    report = f"ray job submit exited with {submit.returncode}:\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"
    assert submit.returncode == 0, report
    assert ray_head.job_status(submission_id) == JobStatus.SUCCEEDED, report
    assert "dsv4: wrote 3 completions" in submit.stdout, report   # the driver's log, streamed back by submit

    tokenizer = ModelTokenizer.from_dir(tiny_checkpoint)
    completions = [json.loads(line) for line in output.read_text().splitlines()]
    assert [c["id"] for c in completions] == [r["id"] for r in records]
    for record, completion in zip(records, completions, strict=True):
        prompt_ids = record.get("prompt_token_ids") or tokenizer.encode(record["prompt"])
        expected = greedy_generate(tiny_model, prompt_ids, record["max_tokens"], Numerics.parse("reference"))
        assert (completion["token_ids"], completion["finish_reason"]) == (expected, "length"), completion["id"]
        assert completion["text"] == tokenizer.decode(expected)
