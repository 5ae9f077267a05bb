"""The memory plan's arithmetic against facts about the LLaMa-2 models."""
import pytest

from bench.memory_plan import LLAMA2, activations, lora_model_states


@pytest.mark.parametrize("name,params", [("llama2_7b", 6.74e9), ("llama2_13b", 13.02e9), ("llama2_70b", 68.98e9)])
def test_parameter_counts_match_the_published_models(name, params):
    shape = next(s for s in LLAMA2 if s.name == name)
    assert shape.params == pytest.approx(params, rel=0.005)


def test_lora_r8_qv_on_7b_has_the_known_trainable_count():
    # peft reports 4,194,304 trainable parameters for r=8 on q_proj/v_proj of LLaMa-2-7b
    assert LLAMA2[0].lora_params(8) == 4_194_304


def test_zero3_partitions_and_offload_moves_states_off_the_gpu():
    shape = LLAMA2[2]
    assert lora_model_states(shape, "zero3", 16) < lora_model_states(shape, "zero3", 8) < lora_model_states(shape, "zero2", 8)
    assert lora_model_states(shape, "zero3_offload", 8) < lora_model_states(shape, "zero3", 16)
    assert activations(shape, batch=8) > activations(shape, batch=4)
