"""`make demo`: start the coordinator, submit a real job over REST, follow it, print the savings.

    python examples/service_demo.py [--spec examples/specs/digits-powersgd.yaml] [--steps 200]

1. `gradwire serve` in a child process: REST API, gRPC telemetry sink, scheduler and an embedded
   Ray head, all on 127.0.0.1, with a fresh SQLite job store under .gradwire/demo/;
2. `POST /v1/jobs` with the spec (2 workers); the scheduler launches it as a Ray job whose
   workers stream a StepReport per step back to the coordinator;
3. follow the job to SUCCEEDED and print the table of its last report: loss, accuracy, bytes
   sent vs a plain all-reduce, time per phase; then Ctrl-C (SIGINT) the coordinator.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "specs" / "digits-powersgd.yaml")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    from gradwire.cli.remote import ApiError, CoordinatorClient
    from gradwire.cli.service import follow
    from gradwire.spec import JobSpec

    folder = ROOT / ".gradwire" / "demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    env = os.environ | {
        "GRADWIRE_PORT": str(port),
        "GRADWIRE_GRPC_PORT": str(free_port()),
        "GRADWIRE_DATABASE_URL": f"sqlite:///{folder / 'coordinator.db'}",
        # the policy's checkpoint root: each job writes its own folder below it
        "GRADWIRE_CHECKPOINT_ROOT": str(folder / "checkpoints"),
    }
    print(f"starting the coordinator on http://127.0.0.1:{port} (REST), Ray embedded ...", flush=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "gradwire.cli", "serve", "--num-cpus", "2"], cwd=ROOT, env=env
    )
    try:
        with CoordinatorClient(f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 180
            while True:  # ready once the database and Ray answer
                if server.poll() is not None:
                    print("the coordinator exited", file=sys.stderr)
                    return 1
                try:
                    if client.http.get("/readyz").status_code == 200:
                        break
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    print("the coordinator did not become ready", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            spec = JobSpec.from_file(args.spec).with_overrides(
                [
                    f"steps={args.steps}",
                    "workers.count=2",
                    "workers.cpus_per_worker=0.5",
                ]
            )
            try:
                job = client.submit(spec.model_dump(mode="json"))
            except ApiError as err:
                print(err, file=sys.stderr)
                return 1
            print(f"submitted {job['id']} ({spec.name}, {args.steps} steps, 2 workers)", flush=True)
            job = follow(client, job["id"])
            return 0 if job["state"] == "SUCCEEDED" else 1
    finally:
        server.send_signal(signal.SIGINT)  # what Ctrl-C does: stop scheduler, Ray, sink, store
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
