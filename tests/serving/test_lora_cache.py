"""The resolver's parts that need no vLLM (they run in the ordinary suite too): finding adapters by name, the
content-addressed conversion cache (once per content, concurrent requests, eviction, broken input) and the check
of a conversion against the served model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from serving_support import tiny_adapter, tiny_llama
from vblora_rs.errors import VBLoRAError
from vblora_rs.serving.base_model import check_lora, read_base
from vblora_rs.serving.lora_cache import LoraCache, find_adapter, folder_bytes


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-base") / "model")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture()
def adapter_dir(tmp_path: str) -> Iterator[str]:
    folder = os.path.join(tmp_path, "adapters")
    for seed, name in enumerate(("a", "b", "c")):
        model = tiny_adapter(seed=seed)
        model.peft_config["default"].save_only_topk_weights = name == "b"
        model.save_pretrained(os.path.join(folder, name))
    yield folder


def test_find_adapter_forms_and_names(tmp_path: str, adapter_dir: str) -> None:
    other = os.path.join(tmp_path, "other")
    os.makedirs(other)
    open(os.path.join(other, "p.safetensors"), "wb").close()
    os.makedirs(os.path.join(other, "a"))
    assert find_adapter([adapter_dir, other], "a") == os.path.join(adapter_dir, "a")  # the first folder wins
    assert find_adapter([other, adapter_dir], "a") == os.path.join(other, "a")
    assert find_adapter([adapter_dir, other], "p") == os.path.join(other, "p.safetensors")
    assert find_adapter([adapter_dir], "missing") is None
    for hostile in ("..", "../adapters/a", "a/../b", ".hidden", "", "a\0b", os.path.join(adapter_dir, "a")):
        assert find_adapter([adapter_dir, os.path.join(adapter_dir, "a")], hostile) is None, hostile


def test_converts_once_per_content(tmp_path: str, adapter_dir: str) -> None:
    from vblora_rs.convert.lora import export_lora

    cache = LoraCache(os.path.join(tmp_path, "cache"), max_bytes=1 << 30)
    first = cache.get(os.path.join(adapter_dir, "a"))
    again = cache.get(os.path.join(adapter_dir, "a"))
    assert first.converted and not again.converted and again.folder == first.folder and cache.conversions == 1
    direct = export_lora(os.path.join(adapter_dir, "a"), os.path.join(tmp_path, "direct"))
    for name in os.listdir(direct):
        with open(os.path.join(direct, name), "rb") as want, open(os.path.join(first.folder, name), "rb") as got:
            assert got.read() == want.read(), name
    # a copy under another name is the same content: the same entry
    shutil.copytree(os.path.join(adapter_dir, "a"), os.path.join(adapter_dir, "a-copy"))
    assert cache.get(os.path.join(adapter_dir, "a-copy")).folder == first.folder and cache.conversions == 1
    # an edited adapter is converted again
    config_path = os.path.join(adapter_dir, "a", "adapter_config.json")
    with open(config_path) as fh:
        config = json.load(fh)
    config["base_model_name_or_path"] = "edited"
    with open(config_path, "w") as fh:
        json.dump(config, fh)
    edited = cache.get(os.path.join(adapter_dir, "a"))
    assert edited.converted and edited.folder != first.folder and cache.conversions == 2
    with open(os.path.join(edited.folder, "adapter_config.json")) as fh:
        assert json.load(fh)["base_model_name_or_path"] == "edited"


def test_concurrent_cold_requests_convert_once(tmp_path: str, adapter_dir: str) -> None:
    cache = LoraCache(os.path.join(tmp_path, "cache"), max_bytes=1 << 30)
    results, errors = [], []
    start = threading.Barrier(6)

    def ask() -> None:
        start.wait()
        try:
            results.append(cache.get(os.path.join(adapter_dir, "b")))
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cache.conversions == 1 and sum(r.converted for r in results) == 1
    assert len({r.folder for r in results}) == 1


def test_concurrent_processes_convert_once(tmp_path: str, adapter_dir: str) -> None:
    """Two processes sharing the cache folder (vLLM's API server can run several): one converts."""
    root = os.path.join(tmp_path, "cache")
    code = (
        "import sys\nfrom vblora_rs.serving.lora_cache import LoraCache\n"
        "print(int(LoraCache(sys.argv[1], 1 << 30).get(sys.argv[2]).converted))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, root, os.path.join(adapter_dir, "c")], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(outputs) == ["0", "0", "1"]
    assert len([e for e in os.listdir(root) if not e.startswith(".")]) == 1


def test_eviction_keeps_the_cache_bounded(tmp_path: str, adapter_dir: str) -> None:
    root = os.path.join(tmp_path, "cache")
    probe = LoraCache(os.path.join(tmp_path, "probe"), max_bytes=1 << 30)
    size = max(folder_bytes(probe.get(os.path.join(adapter_dir, n)).folder) for n in "abc")
    cache = LoraCache(root, max_bytes=2 * size + size // 2)  # room for two entries
    a = cache.get(os.path.join(adapter_dir, "a"))
    b = cache.get(os.path.join(adapter_dir, "b"))
    os.utime(a.folder, (os.stat(a.folder).st_mtime - 10,) * 2)
    os.utime(b.folder, (os.stat(b.folder).st_mtime - 20,) * 2)  # b is now the least recently used
    assert not cache.get(os.path.join(adapter_dir, "a")).converted  # a hit: a becomes the newest
    c = cache.get(os.path.join(adapter_dir, "c"))
    kept = {key for _, _, key in cache.entries()}
    assert kept == {a.key, c.key}, "b, the least recently used, is evicted"
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes
    # an entry larger than the bound is kept while it is the newest
    tiny = LoraCache(os.path.join(tmp_path, "tiny"), max_bytes=1)
    tiny.get(os.path.join(adapter_dir, "a"))
    last = tiny.get(os.path.join(adapter_dir, "b"))
    assert [key for _, _, key in tiny.entries()] == [last.key]


def test_eviction_sizes_follow_replaced_entries(tmp_path: str, adapter_dir: str) -> None:
    """Eviction remembers each entry's bytes by its folder's inode: a folder put in an entry's place is measured."""
    cache = LoraCache(os.path.join(tmp_path, "cache"), max_bytes=1 << 30)
    a = cache.get(os.path.join(adapter_dir, "a"))
    [(_, size, key)] = cache.entries()
    assert (key, size) == (a.key, folder_bytes(a.folder))
    replaced = a.folder + ".new"
    shutil.copytree(a.folder, replaced)
    with open(os.path.join(replaced, "extra.bin"), "wb") as fh:
        fh.write(b"\0" * 12345)
    shutil.rmtree(a.folder)
    os.rename(replaced, a.folder)
    assert [size for _, size, _ in cache.entries()] == [folder_bytes(a.folder)] == [size + 12345]


def test_broken_adapter_leaves_nothing(tmp_path: str, adapter_dir: str) -> None:
    weights = os.path.join(adapter_dir, "a", "adapter_model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    root = os.path.join(tmp_path, "cache")
    cache = LoraCache(root, max_bytes=1 << 30)
    with pytest.raises(VBLoRAError, match="adapter_model.safetensors"):
        cache.get(os.path.join(adapter_dir, "a"))
    assert [e for e in os.listdir(root) if e != ".locks"] == []
    assert cache.get(os.path.join(adapter_dir, "b")).converted  # the others still convert


def test_check_against_the_served_model(tmp_path: str, adapter_dir: str, tiny_base: str) -> None:
    cache = LoraCache(os.path.join(tmp_path, "cache"), max_bytes=1 << 30)
    base = read_base(tiny_base)
    assert base.shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert base.shapes["model.layers.0.self_attn.k_proj"] == (16, 32)
    good = cache.get(os.path.join(adapter_dir, "a")).folder
    check_lora("a", good, base, max_lora_rank=8)
    with pytest.raises(VBLoRAError, match=r"adapter 'a': rank r=4 .* max_lora_rank=1.*--max-lora-rank 8"):
        check_lora("a", good, base, max_lora_rank=1)
    with pytest.raises(VBLoRAError, match=r"adapter 'a': module model\.layers\.0\.self_attn\.q_proj: vLLM serves"):
        check_lora("a", good, base, max_lora_rank=8, servable={"o_proj"})

    other = str(tmp_path / "wider")
    model = tiny_llama()
    model.config.hidden_size = 48  # another base: same module names, other shapes
    model.config.head_dim = 12
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(model.config).save_pretrained(other)
    with pytest.raises(
        VBLoRAError,
        match=r"adapter 'a': module model\.layers\.0\.self_attn\.q_proj has shape \(out, in\) = \(32, 32\) in the "
        r"adapter and \(48, 48\) in the served model",
    ):
        check_lora("a", good, read_base(other), max_lora_rank=8)
    base.shapes.pop("model.layers.1.self_attn.v_proj")
    with pytest.raises(VBLoRAError, match=r"module model\.layers\.1\.self_attn\.v_proj is not a linear layer"):
        check_lora("a", good, base, max_lora_rank=8)
