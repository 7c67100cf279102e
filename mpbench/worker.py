"""Worker entry point: ``python -m mpbench.worker '<json args>'`` executes one job in its run directory.

Exit codes: 0 done/skipped, 1 failed, 3 interrupted (checkpointed; resume later), 4 busy (claimed elsewhere).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT = {"done": 0, "skipped": 0, "failed": 1, "interrupted": 3, "busy": 4}
OUTCOME = {v: k for k, v in EXIT.items() if k != "skipped"}


def run_job(args: dict) -> str:
    import torch

    from mpbench.runner import Execution, execute

    device = torch.device(args.get("device", "cpu"))
    ex = Execution(results=Path(args["results"]), data_root=Path(args["data_root"]), device=device,
                   threads=int(args.get("threads", 0)), suite=args.get("suite", ""), wandb=args.get("wandb", {}),
                   heartbeat_s=float(args.get("heartbeat_s", 30)), stale_after_s=float(args.get("stale_after_s", 300)))
    return execute(Path(args["results"]), args["kind"], args["id"], ex, force=bool(args.get("force")))


def main() -> None:
    outcome = run_job(json.loads(sys.argv[1]))
    sys.exit(EXIT[outcome])


if __name__ == "__main__":
    main()
