"""FSDP2 under `tunelab train` with 2 CPU processes over gloo: the parameters really are sharded (each process holds
half), and a run trains what one process trains with the same global batch, saves weights that load normally, and
resumes from its checkpoints (full and sharded state dicts). On CPUs accelerate alone would have run plain DDP
(training/engines.py).

Tolerance as in test_deepspeed.py: 1e-5, the order of float32 sums being all that differs.
"""

import pytest
from helpers import assert_resumes_exactly, assert_same_training, engine_config, train_with_two_processes

import tunelab

pytestmark = pytest.mark.distributed

FSDP = {"fsdp": "full_shard auto_wrap",
        "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


@pytest.mark.parametrize("method, state_dict, port", [("lora", "FULL_STATE_DICT", 29581),
                                                     ("full", "SHARDED_STATE_DICT", 29583)])
def test_fsdp_shards_and_trains_what_one_process_trains(tiny_model_dir, tmp_path, method, state_dict, port):
    two, one = tmp_path / "two", tmp_path / "one"
    fsdp = {**FSDP, "fsdp_config": {**FSDP["fsdp_config"], "state_dict_type": state_dict}}
    sharded = engine_config(tiny_model_dir, two, method, **fsdp)
    log = train_with_two_processes(sharded, tmp_path, port)
    assert "FSDP over 2 processes: each holds 50% of the" in log
    tunelab.train(engine_config(tiny_model_dir, one, method, gradient_accumulation_steps=2))
    assert_same_training(two, one, method)
    assert_resumes_exactly(two, lambda: train_with_two_processes(sharded, tmp_path, port + 1))
