"""``vblora inspect``: every number equals what the files hold."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import vblora_rs
from safetensors.torch import load_file, save_file
from support.models import MODEL_CASES
from support.peft_reference import peft_get_peft_model
from vblora_rs.cli import main
from vblora_rs.cli.inspect import TensorSpec, histogram, safetensors_header_bytes, st_dtype

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16]
DTYPES += [torch.int32, torch.int64, torch.bool]


def header_bytes_on_disk(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


@pytest.mark.parametrize("seed", range(40))
def test_header_size_equals_safetensors(tmp_path: Path, seed: int) -> None:
    """Random names, dtypes and shapes (offsets crossing digit counts, empty and 0-d tensors), with and without
    metadata: the computed header and file sizes are those safetensors writes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    tensors = {}
    for i in range(1 + rand(12)):
        shape = tuple(rand(40) for _ in range(rand(4)))
        name = f"{'base_model.model.' * rand(2)}m{rand(1000)}.{'x' * rand(30)}.{i}"
        tensors[name] = torch.zeros(shape, dtype=DTYPES[rand(len(DTYPES))])
    metadata = [None, {"format": "pt"}, {"format": "pt", "note": "é" * rand(9)}][rand(3)]
    save_file(tensors, tmp_path / "f.safetensors", metadata=metadata)
    specs = [TensorSpec(k, st_dtype(v.dtype, k), tuple(v.shape), "extras") for k, v in tensors.items()]
    header = safetensors_header_bytes(specs, metadata)
    assert header == header_bytes_on_disk(tmp_path / "f.safetensors")
    assert header + sum(s.nbytes for s in specs) == os.path.getsize(tmp_path / "f.safetensors")


def saved_pair(tmp_path: Path, case: str, **overrides: Any) -> dict[str, Path]:
    """One PEFT model saved as full logits and as top-K (same values), by the real peft package."""
    builder, cfg_kwargs, _ = MODEL_CASES[case]
    torch.manual_seed(0)
    kwargs = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0, **cfg_kwargs, **overrides}
    model = peft_get_peft_model(builder(), peft.VBLoRAConfig(**kwargs))
    paths = {}
    for storage in ("full", "topk"):
        model.peft_config["default"].save_only_topk_weights = storage == "topk"
        paths[storage] = tmp_path / f"{case}-{storage}"
        model.save_pretrained(paths[storage])
    return paths


def report(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


CASES = {
    "llama": {},  # 300 vectors: int16 indices, k=3
    "gpt2": {},  # 40 vectors: uint8 indices, Conv1D
    "opt-extras": {"bias": "all", "modules_to_save": ["final_layer_norm"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sizes_equal_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    paths = saved_pair(tmp_path, case.split("-")[0], **CASES[case])
    sizes = {s: os.path.getsize(p / "adapter_model.safetensors") for s, p in paths.items()}
    assert main(["to-lora", str(paths["full"]), "-o", str(tmp_path / "lora")]) == 0
    capsys.readouterr()
    sizes["lora"] = os.path.getsize(tmp_path / "lora" / "adapter_model.safetensors")
    for kind, extra in (("packed", []), ("half", ["--half", "float16"])):
        assert main(["pack", str(paths["topk"]), "-o", str(tmp_path / kind), *extra]) == 0
        sizes[kind] = os.path.getsize(tmp_path / kind / "adapter_packed.safetensors")
    capsys.readouterr()
    names = {
        "full": "full logits",
        "topk": "PEFT top-K",
        "lora": "LoRA float32",
        "packed": "packed",
        "half": "packed float16",
    }

    packed_rep = report(tmp_path / "packed", capsys)
    assert packed_rep["adapter"]["storage"] == "packed"
    assert packed_rep["adapter"]["file_bytes"] == sizes["packed"]
    packed_formats = {f["name"]: f["total"] for f in packed_rep["formats"]}
    assert packed_formats["packed"] == sizes["packed"] and packed_formats["PEFT top-K"] == sizes["topk"]
    module_bytes = sum(m["stored_bytes"] for m in packed_rep["modules"])
    parts = next(f["parts"] for f in packed_rep["formats"] if f["name"] == "packed")
    assert 0 <= module_bytes - parts["indices"] - parts["weights"] < len(packed_rep["modules"]) * 2

    for storage, path in paths.items():
        rep = report(path, capsys)
        assert rep["adapter"]["storage"] == storage and rep["adapter"]["file_bytes"] == sizes[storage]
        formats = {f["name"]: f for f in rep["formats"]}
        for kind, name in names.items():  # each row is the size of that file, written for real
            assert formats[name]["total"] == sizes[kind] == sum(formats[name]["parts"].values()), name
        own = formats[names[storage]]["parts"]
        assert own["header"] == header_bytes_on_disk(path / "adapter_model.safetensors")
        tensors = load_file(path / "adapter_model.safetensors")
        assert own["bank"] == tensors["base_model.vblora_vector_bank"].nbytes
        extras = sum(v.nbytes for k, v in tensors.items() if "vblora" not in k)
        assert own["extras"] == extras and (extras > 0) == (case == "opt-extras")
        if storage == "topk":
            assert own["indices"] == sum(v.nbytes for k, v in tensors.items() if k.endswith("_topk_indices"))
            assert own["weights"] == sum(v.nbytes for k, v in tensors.items() if k.endswith("_topk_weights"))
        assert sum(m["stored_bytes"] for m in rep["modules"]) == own["logits"] + own["indices"] + own["weights"]
        assert formats["LoRA float32"]["parts"]["lora_A"] == sum(
            4 * rep["config"]["r"] * m["shape"][1] for m in rep["modules"]
        )


def test_modules_and_bank_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Module shapes are the model's; bank usage is counted again here from the files with torch alone."""
    paths = saved_pair(tmp_path, "llama")
    full, topk = report(paths["full"], capsys), report(paths["topk"], capsys)
    drop_bytes = [{k: v for k, v in m.items() if k != "stored_bytes"} for m in full["modules"]]
    assert drop_bytes == [{k: v for k, v in m.items() if k != "stored_bytes"} for m in topk["modules"]]
    assert len(full["modules"]) == 14
    base = MODEL_CASES["llama"][0]()
    for m in full["modules"]:
        weight = base.get_submodule(m["module"]).weight
        assert m["shape"] == list(weight.shape)
        assert m["sub_vectors"] == 3 * (weight.shape[0] + weight.shape[1]) // 8

    tensors = load_file(paths["full"] / "adapter_model.safetensors")
    logits = [v for k, v in tensors.items() if "vblora_logits" in k]
    top, idx = zip(*(t.topk(3) for t in logits))
    counts = torch.bincount(torch.cat([i.reshape(-1) for i in idx]), minlength=300).tolist()
    top1 = torch.cat([torch.softmax(t, -1)[..., 0].reshape(-1) for t in top]).double().mean().item()
    for rep in (full, topk):
        usage = rep["bank_usage"]
        assert usage["counts"] == counts and usage["unused"] == counts.count(0)
        assert usage["selections"] == 3 * usage["sub_vectors"] == 3 * sum(m["sub_vectors"] for m in rep["modules"])
        assert usage["mean_top1_weight"] == pytest.approx(top1, abs=1e-6)
        assert sum(b["vectors"] for b in usage["histogram"]) == 300
        assert usage["most_selected"][0] == [counts.index(max(counts)), max(counts)]


def test_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_pair(tmp_path, "gpt2")["topk"]
    rep = report(path, capsys)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    size = rep["adapter"]["file_bytes"]
    assert f"(PEFT top-K, {size:,d} bytes)" in text
    assert f"file on disk: {size:,d} bytes (equal to the PEFT top-K row)" in text
    # Conv1D stores (in, out) = (32, 96); the table gives (out, in) like nn.Linear
    assert re.search(r"^  transformer\.h\.0\.attn\.c_attn +\(96, 32\) +16 +96$", text, re.M), text
    assert "  vector_length: 16\n" in text and re.search(r"^  6 modules +88 +528$", text, re.M)
    assert f"{rep['bank_usage']['unused']:,d} unused" in text and "mean top-1 weight" in text


def test_histogram_bins() -> None:
    assert histogram([0, 0, 1, 3]) == [(0, 0, 2), (1, 1, 1), (2, 2, 0), (3, 3, 1)]
    counts = list(range(100)) + [0] * 5
    bins = histogram(counts, max_bins=12)
    assert len(bins) <= 12 and bins[0] == (0, 0, 6) and bins[-1][1] == 99
    assert sum(n for _, _, n in bins) == len(counts)
    assert all(hi + 1 == lo for (_, hi, _), (lo, _, _) in zip(bins, bins[1:]))
    assert histogram([]) == [(0, 0, 0)]


def test_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = saved_pair(tmp_path, "opt")["full"]
    assert main(["inspect", str(path), "--plot", str(tmp_path / "usage.png")]) == 0
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".plot.")]
    out = capsys.readouterr()
    assert "bank usage:" in out.out and f"wrote {tmp_path / 'usage.png'}" in out.err


def test_plot_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved_pair(tmp_path, "opt")["full"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["inspect", str(path), "--plot", str(tmp_path / "usage.png")]) == 1
    out = capsys.readouterr()
    assert "--plot needs matplotlib" in out.err and out.out == "" and not (tmp_path / "usage.png").exists()


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing'}: does not exist" in capsys.readouterr().err
    path = saved_pair(tmp_path, "llama")["topk"]
    key = "base_model.model.model.layers.1.mlp.up_proj.vblora_logits_B_topk_indices"
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[key] = tensors[key].to(torch.float32)
    save_file(tensors, path / "adapter_model.safetensors")
    assert main(["inspect", str(path), "--json"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and f"{path}/adapter_model.safetensors: tensor {key} has dtype torch.float32" in out.err
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA", "topk": 0}))
    assert main(["inspect", str(path)]) == 1
    assert "`topk` 0 should be a positive integer value" in capsys.readouterr().err


def test_adapter_saved_by_vblora_rs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    builder, cfg_kwargs, _ = MODEL_CASES["gpt2"]
    model = vblora_rs.get_peft_model(builder(), vblora_rs.VBLoRAConfig(save_only_topk_weights=True, **cfg_kwargs))
    model.save_pretrained(tmp_path / "a")
    rep = report(tmp_path / "a", capsys)
    own = next(f for f in rep["formats"] if f["name"] == "PEFT top-K")
    assert own["total"] == rep["adapter"]["file_bytes"] == os.path.getsize(tmp_path / "a" / "adapter_model.safetensors")
