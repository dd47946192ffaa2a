"""PretrainTask's speed options reach the model and the optimizer; off by default."""

from __future__ import annotations

from scgpt.tasks.pretrain import PretrainTask

from conftest import tiny_config


def _task(**options):
    cfg = tiny_config().to_dict()
    task = PretrainTask(model=cfg, objectives={"gep": 1.0, "mvc": 1.0}, **options)
    task.configure_model()
    return task


def test_options_are_off_by_default():
    task = _task()
    assert not task.model.transformer_encoder.activation_checkpointing
    assert not task.configure_optimizers().defaults.get("fused")
    assert all("_after_attention" not in vars(layer) for layer in task.model.transformer_encoder.layers)


def test_options_reach_the_model_and_optimizer_and_keep_parameter_names():
    plain = set(_task().model.state_dict())
    task = _task(activation_checkpointing=True, fused_adamw=True, compile=True, peak_tflops=989.0)
    assert task.model.transformer_encoder.activation_checkpointing
    assert task.configure_optimizers().defaults["fused"] is True
    assert all({"_before_attention", "_after_attention"} <= set(vars(layer))  # compiled
               for layer in task.model.transformer_encoder.layers)
    assert set(task.model.state_dict()) == plain  # export relies on these names
    assert task.peak_tflops == 989.0
