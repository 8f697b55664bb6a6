"""The ways a multi-process run starts, each with 2 CPU processes over gloo, each training what one process with
gradient accumulation 2 trains (losses, gradient norms and weights to 1e-5):

- two "nodes" of one process each over 127.0.0.1: two `tunelab train` commands with LLaMA-Factory's variables
  (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, FORCE_TORCHRUN), tokenizing into one fresh cache
  at the same time, as two nodes on a shared filesystem would;
- `accelerate launch --multi_gpu --num_processes 2 -m tunelab train ...` (accelerate's torchrun);
- `deepspeed --num_gpus 2 --module tunelab train ...` (DeepSpeed's launcher, with a ZeRO-2 config).

And preprocessing under torchrun: the main process tokenizes while the others wait and then read its cache (with
`overwrite_cache` too); a data error it meets stops every process with its message, without waiting out
`ddp_timeout`.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO, assert_same_training, engine_config

import tunelab

pytestmark = pytest.mark.distributed
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    tunelab.train(engine_config(tiny_model_dir, out, "lora", gradient_accumulation_steps=2))
    return out


def write_config(tmp_path, config: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: list[str], **env: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_nodes_train_as_one_process(tiny_model_dir, tmp_path, one_process):
    out = tmp_path / "two_nodes"
    path = write_config(tmp_path, engine_config(tiny_model_dir, out, "lora", cache_dir=str(tmp_path / "cache")))
    common = {**os.environ, "OMP_NUM_THREADS": "1", "FORCE_TORCHRUN": "1", "NNODES": "2", "NPROC_PER_NODE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29591"}
    nodes = [subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(path)], env={**common, "NODE_RANK": rank},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in ("0", "1")]
    logs = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "DDP over 2 processes" in logs[0]
    assert_same_training(out, one_process, "lora")


def test_accelerate_launch(tiny_model_dir, tmp_path, one_process):
    out = tmp_path / "accelerate"
    path = write_config(tmp_path, engine_config(tiny_model_dir, out, "lora"))
    run([os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
         "29593", "-m", "tunelab", "train", str(path)])
    assert_same_training(out, one_process, "lora")


def test_deepspeed_launcher(tiny_model_dir, tmp_path, one_process):
    pytest.importorskip("deepspeed")
    if shutil.which("deepspeed", path=BIN) is None:
        pytest.skip("the deepspeed command is not installed beside this Python")
    out = tmp_path / "deepspeed"
    path = write_config(tmp_path, engine_config(tiny_model_dir, out, "lora",
                                                deepspeed=str(REPO / "examples" / "deepspeed" / "ds_z2_config.json")))
    run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29595", "--module", "tunelab", "train",
         str(path)])
    assert_same_training(out, one_process, "lora")


def two_processes(path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "FORCE_TORCHRUN": "1",
                                            "NPROC_PER_NODE": "2", "MASTER_PORT": str(port)})


def test_the_main_process_tokenizes_and_the_other_reads_its_cache(tiny_model_dir, tmp_path):
    for port, overwrite in ((29621, False), (29622, True)):
        path = write_config(tmp_path, engine_config(tiny_model_dir, tmp_path / f"run{port}", "lora", max_steps=1,
                                                    cache_dir=str(tmp_path / "cache"), overwrite_cache=overwrite))
        result = two_processes(path, port)
        assert result.returncode == 0, result.stderr[-3000:]
        # Both processes log; a fresh cache is written once and read once, and `overwrite_cache` rewrites it once.
        assert result.stderr.count("saved the tokenized data to cache") == 1, result.stderr[-3000:]
        assert result.stderr.count("loaded tokenized data from cache") == 1, result.stderr[-3000:]


def test_a_data_error_on_the_main_process_stops_both_processes_with_its_message(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": "Hi", "output": "Hello."}] * 8 + [{"instruction": "Hi", "output": ""}]
    (data / "broken.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.json"}}))
    path = write_config(tmp_path, engine_config(tiny_model_dir, tmp_path / "run", "lora", dataset="broken",
                                                dataset_dir=str(data), strict_data=True, ddp_timeout=600))
    started = time.monotonic()
    result = two_processes(path, 29623)
    assert result.returncode != 0
    assert "broken.json" in result.stderr and "sample 8" in result.stderr, result.stderr[-3000:]
    # The waiting process is stopped with the failed one, not after ddp_timeout.
    assert time.monotonic() - started < 300
