"""The model level is PEFT's own: each behaviour the issue "Build on PEFT itself" found missing or different in the
hand-written copy, checked on a model built through vblora_rs (PEFT's classes with our tuner and layers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peft
import pytest
import torch
from support.models import make_mlp
from torch import nn
from vblora_rs import PeftModel, VBLoRAConfig, VBLoRALayer, VBLoRAModel, get_peft_model
from vblora_rs.demo.mini_models import build

X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


def cfg(**kw: object) -> VBLoRAConfig:
    return VBLoRAConfig(**{"vector_length": 8, "num_vectors": 16, "init_logits_std": 1.0, **kw})


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_get_peft_model_is_peft_s_with_our_tuner() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    assert type(model) is peft.PeftModel and isinstance(model.base_model, VBLoRAModel)
    assert isinstance(model.base_model.model.lin0, peft.tuners.vblora.layer.Linear)
    assert isinstance(model.base_model.model.lin0, VBLoRALayer)
    # the tuner runs the model itself (PEFT's BaseTuner.forward)
    torch.testing.assert_close(model.base_model(X), out(model), rtol=0, atol=0)
    # PeftModel's own push_to_hub, not the wrapped model's
    assert type(model).push_to_hub is peft.PeftModel.push_to_hub


def test_second_adapter_stays_inactive_where_only_it_targets() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], modules_to_save=["head"])).eval()
    before = out(model)
    model.add_adapter("other", cfg(target_modules=["lin2"], modules_to_save=["head"]))
    torch.testing.assert_close(out(model), before, rtol=0, atol=0)
    assert model.base_model.model.lin2.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".other" in n for n in trainable)


def test_delete_unmerged_adapter_keeps_the_merged_one_merged() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    model.add_adapter("other", cfg(target_modules=["lin0"]))
    model.merge_adapter(["default"])
    merged_weight = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
    model.delete_adapter("other")
    layer = model.base_model.model.lin0
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.get_base_layer().weight, merged_weight)


def test_two_active_adapters_wrapping_one_module_to_save_is_refused() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], modules_to_save=["head"]))
    model.add_adapter("other", cfg(target_modules=["lin1"], modules_to_save=["head"]))
    with pytest.raises(ValueError):
        model.base_model.set_adapter(["default", "other"])


def test_seq_cls_task_type_trains_and_saves_the_head(tmp_path: Path) -> None:
    bert = build("bert-seq-cls", num_hidden_layers=1, max_position_embeddings=512, num_labels=2).train()
    model = get_peft_model(bert, cfg(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_saved_folder_subfolder_bin_and_config(tmp_path: Path) -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    model.add_adapter("other", cfg(target_modules=["lin1"]))
    model.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert {"README.md", "adapter_config.json", "adapter_model.bin"} <= set(os.listdir(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_version"] == peft.__version__ and "base_model_name_or_path" in config
    # the named subfolder's adapter, not "default"
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path / "a", subfolder="other")
    assert isinstance(loaded.base_model.model.lin1, VBLoRALayer)
    assert not isinstance(loaded.base_model.model.lin0, VBLoRALayer)


@pytest.mark.parametrize("topk", [False, True])
def test_low_cpu_mem_usage_and_autocast_keywords(tmp_path: Path, topk: bool) -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0", "lin1"], save_only_topk_weights=topk)).eval()
    model.save_pretrained(tmp_path)
    expected = out(model)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path, low_cpu_mem_usage=True, autocast_adapter_dtype=False)
    torch.testing.assert_close(out(loaded), expected, rtol=0, atol=0)
    assert loaded.base_model.model.lin0.is_compact("default") == topk


def test_from_pretrained_keeps_the_given_config(tmp_path: Path) -> None:
    get_peft_model(make_mlp(), cfg(target_modules=["lin0"])).save_pretrained(tmp_path)
    config = VBLoRAConfig.from_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config


def test_disable_adapter_layers_and_the_context_manager() -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"])).eval()
    adapted = out(model)
    model.base_model.disable_adapter_layers()
    plain = out(model)
    assert not torch.equal(plain, adapted)
    with model.disable_adapter():
        torch.testing.assert_close(out(model), plain, rtol=0, atol=0)
    # layers disabled before the block stay disabled after it
    torch.testing.assert_close(out(model), plain, rtol=0, atol=0)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(out(model), adapted, rtol=0, atol=0)


def test_set_requires_grad_and_config_api(tmp_path: Path) -> None:
    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"]))
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vblora_logits" in n)
    model.save_pretrained(tmp_path)
    config = VBLoRAConfig.from_json_file(tmp_path / "adapter_config.json")
    assert config["peft_type"] == "VBLORA"
    assert VBLoRAConfig(**model.peft_config["default"].to_dict()).r == model.peft_config["default"].r
    assert model.peft_config["default"].peft_type == peft.PeftType.VBLORA
    assert not model.peft_config["default"].is_prompt_learning
    with pytest.raises(ValueError):
        VBLoRAConfig(task_type="NOT_A_TASK", target_modules=["lin0"])


def test_remove_from_peft_refuses_while_a_compact_adapter_is_alive(tmp_path: Path) -> None:
    import vblora_rs

    model = get_peft_model(make_mlp(), cfg(target_modules=["lin0"], save_only_topk_weights=True))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path)
    assert loaded.base_model.model.lin0.is_compact("default")
    with pytest.raises(vblora_rs.VBLoRAError, match="compact adapters"):
        vblora_rs.remove_from_peft()
    assert vblora_rs.is_applied()
    # a model built with PEFT's own classes saves as PEFT saves it, whichever hooks are in force
    with vblora_rs.tuner.peft_backend.peft_classes():
        theirs = peft.get_peft_model(make_mlp(), cfg(target_modules=["lin0"], save_only_topk_weights=True))
    assert type(theirs.base_model) is peft.tuners.vblora.VBLoRAModel
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    assert any(k.endswith("_topk_indices") for k in load_file(tmp_path / "theirs" / "adapter_model.safetensors"))


def test_a_dropped_compact_model_awaiting_the_cycle_collector_does_not_block_remove_from_peft(tmp_path: Path) -> None:
    import gc

    import vblora_rs

    vblora_rs.apply_to_peft()
    get_peft_model(make_mlp(), cfg(target_modules=["lin0"], save_only_topk_weights=True)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path)
    assert loaded.base_model.model.lin0.is_compact("default")
    loaded.cycle = [loaded]  # unreachable once dropped, but only the cycle collector frees it
    del loaded
    gc.disable()  # no automatic collection between here and the switch
    try:
        vblora_rs.remove_from_peft()
        assert not vblora_rs.is_applied()
    finally:
        gc.enable()
        vblora_rs.apply_to_peft()


@pytest.mark.parametrize("field, value", [("init_logits_std", None), ("target_modules", [1, "lin0"])])
def test_hostile_config_values_are_named_errors(field: str, value: object) -> None:
    # PEFT's config takes any value; the tuner refuses them before anything is allocated, naming the field
    import vblora_rs

    base = make_mlp()
    with pytest.raises(vblora_rs.VBLoRAError, match=f"config of adapter 'default': {field}"):
        get_peft_model(base, cfg(**{"target_modules": ["lin0"], field: value}))
    assert type(base.lin0) is nn.Linear
