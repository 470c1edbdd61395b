"""A VB-LoRA adapter as it is stored, for tools that read adapters without building a model.

:func:`read_adapter` reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, full
logits or top-K), checks every VB-LoRA tensor against the config, and groups the tensors by module.
:func:`module_factors` turns each module into plain LoRA factors ``A (r, in)`` and ``B (out, r)``.

Adapters are found by the one locator (:mod:`.storage.locate`); each kind has a reader returning the config and
the tensors under PEFT's checkpoint keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import ops
from ..errors import VBLoRAError
from ..storage import finite
from ..storage.adapter_config import AdapterConfig, read_config
from ..storage.locate import locate
from ..storage.names import BANK_KEY, CONFIG_NAME, TOPK_INDICES, TOPK_WEIGHTS
from . import topk
from .safetensors_file import check_float, read_safetensors

__all__ = ["AdapterFile", "ModuleEntry", "module_factors", "read_adapter"]

MODULE_PREFIX = "base_model.model."
LOGITS_A = ".vblora_logits_A"
LOGITS_B = ".vblora_logits_B"
FULL = "full"
TOPK = "topk"
PACKED = "packed"  # the storage kind, as storage.locate names the packed file kind


@dataclass(frozen=True)
class ModuleEntry:
    """One adapted module: its path in the model, the shape of its weight and the checkpoint keys it owns."""

    name: str
    out_features: int
    in_features: int
    sub_vectors_A: int  # r * in_features / vector_length
    sub_vectors_B: int  # out_features / vector_length * r
    keys: tuple[str, ...]

    @property
    def sub_vectors(self) -> int:
        return self.sub_vectors_A + self.sub_vectors_B


@dataclass
class AdapterFile:
    """A VB-LoRA adapter read from disk; ``tensors`` keeps PEFT's checkpoint keys.

    ``storage`` is how the logits are held: ``"full"`` (``<module>.vblora_logits_A`` / ``_B``) or ``"topk"``
    (``..._topk_indices`` and ``..._topk_weights``, the first k-1 softmax weights of every sub-vector).
    """

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    weights_path: str
    storage: str
    modules: dict[str, ModuleEntry]
    # top-K storage checked in one call: every module's stored indices (S, k) and weights (S, k-1), its A grid's
    # rows then its B grid's, module after module in the order of ``modules`` (None where checked module by module)
    stored_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def bank(self) -> torch.Tensor:
        return self.tensors[BANK_KEY]

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        """Tensors that are not VB-LoRA's (modules_to_save weights, biases), under their checkpoint keys."""
        owned = {BANK_KEY}.union(*(m.keys for m in self.modules.values()))
        return {k: v for k, v in self.tensors.items() if k not in owned}

    def logits(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Full logits ``(r, in/L, num_vectors)`` and ``(out/L, r, num_vectors)`` of a module (full storage)."""
        base = MODULE_PREFIX + module
        return self.tensors[base + LOGITS_A], self.tensors[base + LOGITS_B]

    def topk(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored top-K ``(indices_A, weights_A, indices_B, weights_B)`` of a module (top-K storage); the weights
        hold k-1 values per sub-vector, as PEFT saves them."""
        base = MODULE_PREFIX + module
        t = self.tensors
        return (
            t[base + LOGITS_A + TOPK_INDICES],
            t[base + LOGITS_A + TOPK_WEIGHTS],
            t[base + LOGITS_B + TOPK_INDICES],
            t[base + LOGITS_B + TOPK_WEIGHTS],
        )


# --- reading ------------------------------------------------------------------------------------------


def _read_peft(folder: str, weights_path: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    read_config(os.path.join(folder, CONFIG_NAME))  # types, bounds, regexes, JSON depth: before anything else
    return AdapterConfig.from_pretrained(folder), read_safetensors(weights_path)


def _read_packed(folder: str, weights_path: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    from .packed import read_packed

    return read_packed(weights_path)  # the config travels inside the packed file


def read_adapter(path: Union[str, os.PathLike]) -> AdapterFile:
    """Read and check a VB-LoRA adapter (anything :func:`.storage.locate.locate` accepts). Bad input raises
    VBLoRAError naming the file and the tensor at fault."""
    found = locate(path)
    read = _read_packed if found.kind == PACKED else _read_peft
    config, tensors = read(found.folder, found.weights_path)
    storage, modules, rows = _index(config, tensors, found.weights_path)
    if found.kind == PACKED:
        storage = PACKED  # top-K data, in the packed file
    return AdapterFile(config, tensors, found.weights_path, storage, modules, rows)


# --- checking -----------------------------------------------------------------------------------------


_TAILS = ("", TOPK_INDICES, TOPK_WEIGHTS)
_MARKER = LOGITS_A[:-1]  # ".vblora_logits_"


def _split_key(key: str) -> Optional[tuple[str, str, str]]:
    """``(module, "A"|"B", "" | TOPK_INDICES | TOPK_WEIGHTS)`` of a VB-LoRA logits key
    (``base_model.model.<module>.vblora_logits_<A|B><tail>``), None for other keys."""
    head, marker, rest = key.rpartition(_MARKER)
    part, tail = rest[:1], rest[1:]
    if not marker or part not in ("A", "B") or tail not in _TAILS or not key.startswith(MODULE_PREFIX):
        return None
    return key[len(MODULE_PREFIX) : len(head)], part, tail


def _index(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], path: str
) -> tuple[str, dict[str, ModuleEntry], Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Storage kind, per-module entries and (top-K) the stored rows checked at once (:attr:`AdapterFile.stored_rows`),
    after checking every VB-LoRA tensor against the config."""
    _check_bank(config, tensors, path)
    found: dict[str, dict[tuple[str, str], str]] = {}
    for key in tensors:
        parts = _split_key(key)
        if parts is None:
            if "vblora" in key and key != BANK_KEY:
                raise VBLoRAError(f"{path}: tensor {key} is not a VB-LoRA tensor of PEFT's layout")
            continue
        module, part, tail = parts
        found.setdefault(module, {})[(part, tail)] = key
    if not found:
        raise VBLoRAError(f"{path}: holds no VB-LoRA logits (no *.vblora_logits_A / _B tensors)")
    layouts = {frozenset(keys) for keys in found.values()}
    full = frozenset({("A", ""), ("B", "")})
    topk = frozenset((p, t) for p in "AB" for t in (TOPK_INDICES, TOPK_WEIGHTS))
    storage = FULL if layouts == {full} else TOPK if layouts == {topk} else None
    if storage is None:
        for module, keys in sorted(found.items()):
            if frozenset(keys) not in (full, topk):
                raise VBLoRAError(
                    f"{path}: module {module} holds {sorted(keys.values())}; expected vblora_logits_A and _B, "
                    "or their _topk_indices and _topk_weights"
                )
        raise VBLoRAError(f"{path}: mixes full logits and top-K tensors; PEFT saves one or the other")
    rows = _checked_topk_rows(config, tensors, path, found) if storage == TOPK else None
    if rows is not None:
        modules = {m: _entry(config, tensors, path, m, found[m], TOPK_INDICES) for m in sorted(found)}
        return storage, modules, rows
    check = _check_full if storage == FULL else _check_topk
    modules = {module: check(config, tensors, path, module, found[module]) for module in sorted(found)}
    return storage, modules, None


def _checked_topk_rows(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], path: str, found: dict[str, dict[tuple[str, str], str]]
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Every module's stored top-K rows (:attr:`AdapterFile.stored_rows`) if they pass :func:`_check_topk`'s checks,
    their values checked in one call over all of them (a call per module cost more than the checking: 210 modules,
    20 ms). None when something is wrong or the modules' dtypes differ: the module by module check then runs and
    names the tensor at fault."""
    k = config.topk
    indices, weights, dtypes = [], [], set()
    for module in sorted(found):
        keys = found[module]
        for part in "AB":
            ikey, wkey = keys[(part, TOPK_INDICES)], keys[(part, TOPK_WEIGHTS)]
            idx, w = tensors[ikey], tensors[wkey]
            if idx.dim() != 3:
                return None
            try:
                topk.check_layout(path, ikey.removesuffix(TOPK_INDICES), idx, w, k)
            except VBLoRAError:
                return None
            dtypes.add((idx.dtype, w.dtype))
            indices.append(idx.reshape(-1, k))
            weights.append(w.reshape(indices[-1].shape[0], k - 1))  # rows from the indices: k=1 has no weights
    if len(dtypes) != 1:
        return None
    rows = torch.cat(indices), torch.cat(weights)
    return None if topk.value_problem(*rows, config.num_vectors) else rows


def _check_bank(config: AdapterConfig, tensors: dict[str, torch.Tensor], path: str) -> None:
    bank = tensors.get(BANK_KEY)
    if bank is None:
        raise VBLoRAError(f"{path}: missing tensor {BANK_KEY}")
    want = (config.num_vectors, config.vector_length)
    if tuple(bank.shape) != want:
        raise VBLoRAError(
            f"{path}: tensor {BANK_KEY} has shape {tuple(bank.shape)}, the config says "
            f"(num_vectors, vector_length) = {want}"
        )
    check_float(bank, BANK_KEY, path)
    if not torch.isfinite(bank).all():
        raise VBLoRAError(f"{path}: tensor {BANK_KEY} holds NaN or infinite values")


def _entry(
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    path: str,
    module: str,
    keys: dict[tuple[str, str], str],
    tail: str,
) -> ModuleEntry:
    """Check ``(r, in/L)`` and ``(out/L, r)``, the leading dims of the module's ``tail`` tensors, and build its
    entry."""
    key_A, key_B = keys[("A", tail)], keys[("B", tail)]
    shape_A, shape_B = tuple(tensors[key_A].shape), tuple(tensors[key_B].shape)
    if len(shape_A) != 3 or shape_A[0] != config.r or shape_A[1] == 0:
        raise VBLoRAError(f"{path}: tensor {key_A} has shape {shape_A}, expected (r={config.r}, in/L, ...)")
    if len(shape_B) != 3 or shape_B[1] != config.r or shape_B[0] == 0:
        raise VBLoRAError(f"{path}: tensor {key_B} has shape {shape_B}, expected (out/L, r={config.r}, ...)")
    L = config.vector_length
    return ModuleEntry(
        name=module,
        out_features=shape_B[0] * L,
        in_features=shape_A[1] * L,
        sub_vectors_A=shape_A[0] * shape_A[1],
        sub_vectors_B=shape_B[0] * shape_B[1],
        keys=tuple(sorted(keys.values())),
    )


def _check_full(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], path: str, module: str, keys: dict[tuple[str, str], str]
) -> ModuleEntry:
    for part in "AB":
        key = keys[(part, "")]
        logits = tensors[key]
        check_float(logits, key, path)
        if logits.dim() != 3 or logits.shape[-1] != config.num_vectors:
            raise VBLoRAError(
                f"{path}: tensor {key} has shape {tuple(logits.shape)}, expected 3 dims ending in "
                f"num_vectors={config.num_vectors}"
            )
        problem = finite.logits_problem(topk.as_numpy(logits))  # THE rule: no NaN or +inf, no all -inf row
        if problem:
            raise VBLoRAError(f"{path}: tensor {key}: {problem}")
    return _entry(config, tensors, path, module, keys, "")


def _check_topk(
    config: AdapterConfig, tensors: dict[str, torch.Tensor], path: str, module: str, keys: dict[tuple[str, str], str]
) -> ModuleEntry:
    for part in "AB":
        ikey, wkey = keys[(part, TOPK_INDICES)], keys[(part, TOPK_WEIGHTS)]
        indices = tensors[ikey]
        if indices.dim() != 3:
            raise VBLoRAError(f"{path}: tensor {ikey} has shape {tuple(indices.shape)}, expected 3 dims")
        key = ikey.removesuffix(TOPK_INDICES)
        topk.check_stored(path, key, indices, tensors[wkey], config.num_vectors, config.topk)
    return _entry(config, tensors, path, module, keys, TOPK_INDICES)


# --- LoRA factors -------------------------------------------------------------------------------------


def module_factors(adapter: AdapterFile, progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A (r, in), B (out, r))}`` in float32, equal to PEFT's ``_get_lora_matrices`` of the adapter.
    ``progress`` shows a bar (on stderr) once the work has taken a second."""
    from .._progress import bar

    config, bank = adapter.config, adapter.bank
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shown = bar(len(adapter.modules), "modules", unit="module", enabled=progress)
    for name in adapter.modules:
        shown.update(1)
        try:
            if adapter.storage == FULL:
                logits_A, logits_B = adapter.logits(name)
                A, B = ops.low_rank_matrices(logits_A.contiguous(), logits_B.contiguous(), bank, config.topk)
            else:  # what PEFT's forward computes from the dense -inf logits it would rebuild (see compact)
                idx_A, w_A, idx_B, w_B = adapter.topk(name)
                idx_A, w_A = topk.compute_form(idx_A, w_A, config.num_vectors)
                idx_B, w_B = topk.compute_form(idx_B, w_B, config.num_vectors)
                A, B = ops.low_rank_matrices_from_topk(idx_A, w_A, idx_B, w_B, bank)
        except VBLoRAError as exc:
            raise VBLoRAError(f"{adapter.weights_path}: module {name}: {exc}") from None
        out[name] = (A.contiguous(), B.contiguous())
    shown.close()
    return out
