"""Start one training process per device through torchrun, as `tunelab train` does on a multi-GPU machine."""

import os
import subprocess
import sys


def relaunch_under_torchrun_if_needed(cli_args: list[str]) -> bool:
    """Run `tunelab <cli_args>` under torchrun when several devices are asked for; True when that happened.

    Already inside torchrun (LOCAL_RANK set) nothing is relaunched. On CPU, FORCE_TORCHRUN=1 with NPROC_PER_NODE=N
    starts N processes over gloo, which is how the distributed path is tested without a GPU.
    """
    if "LOCAL_RANK" in os.environ:
        return False
    forced = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true")
    nproc = os.environ.get("NPROC_PER_NODE")
    if not forced:
        import torch

        if torch.cuda.device_count() <= 1:
            return False
        nproc = nproc or str(torch.cuda.device_count())
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc or 2}",
               f"--nnodes={os.environ.get('NNODES', '1')}", f"--node_rank={os.environ.get('NODE_RANK', '0')}",
               f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
               f"--master_port={os.environ.get('MASTER_PORT', '29500')}", "-m", "tunelab", *cli_args]
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return True
