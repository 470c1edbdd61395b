"""VB-LoRA layers: ``VBLoRALayer`` and ``Linear``, subclasses of PEFT's ``peft.tuners.vblora`` classes.

PEFT's classes hold the adapter state and its bookkeeping; what is overridden here are the compute paths and the
compact top-K form. Two ways to build A and B: with autograd (training, or tensors the Rust kernels cannot take,
e.g. CUDA) through the same torch ops as PEFT, and without autograd on CPU (merge, unmerge, ``get_delta_weight``,
no-grad forwards) through the Rust kernels, which select, softmax and gather in one pass and merge every adapter
into the weight in one pass. Both give PEFT's results bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.tuners.vblora import layer as peft_layer
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import ops
from ..convert import topk as topk_codec
from ..errors import VBLoRAError
from ..ops import MergeTerm
from ..storage.adapter_config import size_problem
from . import cache as lora_cache
from . import sharding, shared_bank
from . import topk_table as compact
from .batches import BASE_ADAPTER, RowGroups
from .cache import CachedLoRA, evict, param_of, stamp
from .memory_budget import MemoryBudget

# The cause first; PEFT's words (which PEFT's tests and users' code match on) after. Nothing is infinite.
TOPK_TRAINING_ERROR = (
    "This VB-LoRA adapter holds only its top-K indices and weights (it was loaded from a `save_only_topk_weights` "
    "file, or made by compact_()): its dense logits are gone, so it cannot be trained. For inference call "
    "model.eval() or run under torch.no_grad(); to train on, load a checkpoint that keeps the full logits "
    "(Trainer checkpoints do, see docs/checkpoints.md). PEFT says: Found infinity values in VB-LoRA logits. "
    "Ensure training was not resumed from a `save_only_topk_weights` model."
)
# the VBLoRAConfig fields a layer reads, and their defaults when a layer is built without a config
LAYER_FIELDS = {"topk": 2, "num_vectors": None, "vector_length": None, "vblora_dropout": 0.0, "init_logits_std": 0.01}


def layer_settings(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The layer fields of ``config`` (PEFT's VBLoRAConfig, or None), with the keyword values given explicitly."""
    settings = {}
    for name, default in LAYER_FIELDS.items():
        value = overrides.get(name)
        if value is None:
            value = getattr(config, name, default) if config is not None else default
        if value is None:
            raise TypeError(f"VB-LoRA layer: `{name}` is required (pass it or a VBLoRAConfig)")
        settings[name] = value
    return settings


# One stateless Identity for every adapter without dropout (PEFT makes one per adapter per layer: a thousand
# adapters on a 7B model would be 224,000 modules).
_NO_DROPOUT = nn.Identity()


class DropoutDict(nn.ModuleDict):
    """``vblora_dropout``: adapter -> dropout module, as in PEFT. Adapters without dropout map to one shared
    Identity that is *not* registered per adapter: module walks (``named_modules``, ``train()``, ``parameters()``)
    visit every registered child, so a thousand adapters would make each walk cost layers x adapters."""

    def __init__(self) -> None:
        super().__init__()
        self._identity: set[str] = set()

    def set(self, name: str, p: float) -> None:
        self.pop_adapter(name)
        if p > 0.0:
            self[name] = nn.Dropout(p=p)
        else:
            self._identity.add(name)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        # PEFT's device move re-assigns every entry (``d[name] = d[name].to(device)``): the shared Identity comes
        # back as itself and must stay unregistered, or each adapter adds a child to every layer again
        if module is _NO_DROPOUT:
            self.pop_adapter(key)
            self._identity.add(key)
            return
        self._identity.discard(key)
        super().__setitem__(key, module)

    def pop_adapter(self, name: str) -> None:
        self._identity.discard(name)
        if name in self._modules:
            del self._modules[name]

    def __getitem__(self, key: str) -> nn.Module:  # type: ignore[override]
        return _NO_DROPOUT if key in self._identity else super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        return key in self._identity or super().__contains__(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.pop_adapter(key)

    def keys(self):  # type: ignore[no-untyped-def]
        return [*self._modules.keys(), *sorted(self._identity)]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._modules) + len(self._identity)


class LogitsDict(nn.ParameterDict):
    """``vblora_logits_A`` / ``_B``: a ParameterDict whose compact (top-K) adapters get their dense logits built
    the first time someone asks for them by name, with the values PEFT would hold (log-weights at the kept
    indices, -inf elsewhere). ``in``, ``keys()`` and iteration see only the adapters that have dense logits."""

    def __init__(self, owner: VBLoRALayer) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # a plain attribute: not a submodule of the dict

    def __getitem__(self, key: str) -> nn.Parameter:
        if key not in self and key in self._owner.vblora_topk_rows:
            self._owner._materialize_logits(key)
        return super().__getitem__(key)


class VBLoRALayer(peft_layer.VBLoRALayer):
    """PEFT's VB-LoRA layer state, plus the compact top-K form and the A/B cache."""

    # Attributes that hold adapter weights, keyed by adapter name (PEFT's).
    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")
    # Other per-adapter attributes (``vblora_topk``: the shared compact top-K tables, keyed by adapter;
    # ``vblora_topk_rows``: where this layer's rows start in them).
    other_param_names = ("r", "topk", "vblora_dropout", "vblora_topk", "vblora_topk_rows")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"Target module {base.__class__.__name__} is not supported. Currently, only the following modules "
                "are supported: `torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`."
            )
        super().__init__(base_layer, **kwargs)
        self.vblora_dropout = DropoutDict()
        self.vblora_logits_A = LogitsDict(self)
        self.vblora_logits_B = LogitsDict(self)
        # (PEFT's empty vblora_vector_bank stays until update_layer holds the tuner's bank through a view without
        # parameters: see shared_bank, one owner for FSDP)
        # Compact adapters (loaded from top-K weights, or ``compact_``-ed): the tuner's shared tables and this
        # layer's first row in them (A's rows, then B's). Such adapters have no entry in the logits dicts.
        # The tables are held, not registered: a process may hold a thousand adapters, and registering them in
        # every layer would make state_dict() and module walks grow with layers x adapters.
        self.__dict__["vblora_topk"] = {}
        self.vblora_topk_rows: dict[str, int] = {}
        # Adapters whose logits come from top-K weights: they cannot be trained (PEFT's RuntimeError); a flag
        # rather than PEFT's `isinf().any()` on every training forward, which syncs and breaks compiled graphs.
        self.vblora_from_topk: set[str] = set()
        # A and B per adapter while no gradient needs them (see cache.CachedLoRA); a plain dict, not state.
        self._lora_cache: dict[str, CachedLoRA] = {}

    def has_adapter(self, adapter_name: str) -> bool:
        """Whether this layer holds ``adapter_name``, with dense logits or in compact top-K form."""
        # _modules[...] rather than self.vblora_logits_A: nn.Module resolves submodules in __getattr__, after a
        # failed normal lookup, which costs ~1 us; this runs per layer and token
        return adapter_name in self._modules["vblora_logits_A"] or adapter_name in self.vblora_topk_rows

    def is_compact(self, adapter_name: str) -> bool:
        return adapter_name in self.vblora_topk_rows

    def delete_adapter(self, adapter_name: str) -> None:
        self.vblora_from_topk.discard(adapter_name)
        self._lora_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def update_layer(  # type: ignore[override]
        self,
        adapter_name: str,
        vblora_vector_bank: nn.ParameterDict,
        r: int,
        config: Any = None,
        inference_mode: bool = False,
        *,
        init_logits: bool = True,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name``: logits ``A (r, in/L, num_vectors)`` and ``B (out/L, r, num_vectors)``,
        moved and cast to the base layer's device and floating dtype as PEFT does. Settings come from ``config``
        (PEFT's VBLoRAConfig) or the keywords (``topk``, ``num_vectors``, ``vector_length``, ``vblora_dropout``,
        ``init_logits_std``). With ``init_logits=False`` the logits are left on the meta device: the adapter is
        about to be filled from a checkpoint (the load hook gives them memory once the file's shapes are checked, or
        makes the adapter compact, see :meth:`set_compact`)."""
        s = layer_settings(config, kwargs)
        topk, num_vectors, vector_length = s["topk"], s["num_vectors"], s["vector_length"]
        problem = size_problem({"r": r, "topk": topk, "num_vectors": num_vectors, "vector_length": vector_length})
        if problem:
            raise ValueError(problem)
        if self.in_features % vector_length != 0:
            raise ValueError(f"`in_features` {self.in_features} must be divisible by `vector_length` {vector_length}")
        if self.out_features % vector_length != 0:
            raise ValueError(f"`out_features` {self.out_features} must be divisible by `vector_length` {vector_length}")
        if adapter_name not in vblora_vector_bank:
            raise ValueError(f"the vector bank holds no bank for adapter {adapter_name!r}")
        shape = tuple(vblora_vector_bank[adapter_name].shape)
        if shape != (num_vectors, vector_length):
            raise ValueError(
                f"vector bank of adapter {adapter_name!r} has shape {shape}, expected "
                f"(num_vectors, vector_length) = ({num_vectors}, {vector_length})"
            )

        self._lora_cache.pop(adapter_name, None)
        self.r[adapter_name] = r
        self.topk[adapter_name] = topk
        self.vblora_dropout.set(adapter_name, s["vblora_dropout"])
        shared_bank.hold(self, vblora_vector_bank)
        device = None if init_logits else torch.device("meta")
        self.vblora_logits_A[adapter_name] = nn.Parameter(
            torch.zeros(r, self.in_features // vector_length, num_vectors, device=device), requires_grad=True
        )
        self.vblora_logits_B[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features // vector_length, r, num_vectors, device=device), requires_grad=True
        )
        self.reset_vblora_logits(adapter_name, s["init_logits_std"])
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # Only the new adapter's tensors change trainability (PEFT re-runs set_adapter over every adapter here,
        # which touches all banks in every layer: quadratic when a process loads many adapters).
        trainable = adapter_name in self.active_adapters and not inference_mode
        for layer_name in self.adapter_layer_names:
            holder = getattr(self, layer_name)
            if adapter_name in holder:
                holder[adapter_name].requires_grad_(trainable)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's move of one adapter to the base layer's device and floating dtype, with one difference: an entry
        is left alone when *its own* tensors are on the meta device. PEFT skips a whole dict when any adapter's
        entry in it is meta, which scans every adapter's parameters of every dict: loading the n-th adapter then
        costs n per layer, quadratic in a process that serves many adapters."""
        base_device, base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        target_device = device if device is not None else base_device
        if target_device is None:
            return
        floating = base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex)
        float_dtype = base_dtype if floating else None
        for holder_name in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, holder_name, None)
            if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in holder:
                continue
            item = holder[adapter_name]
            tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            item_dtype = getattr(item, "dtype", None)
            cast = float_dtype is not None and (
                item_dtype is None or item_dtype.is_floating_point or item_dtype.is_complex
            )
            if any(t.is_meta for t in tensors):
                if cast:  # still no memory, but the dtype the checkpoint will be copied into (and autocast sees)
                    holder[adapter_name] = item.to(dtype=float_dtype)
                continue
            holder[adapter_name] = item.to(target_device, dtype=float_dtype) if cast else item.to(target_device)

    def reset_vblora_logits(self, adapter_name: str, init_logits_std: float) -> None:
        logits_A = self._modules["vblora_logits_A"]._parameters.get(adapter_name)
        if logits_A is not None and not logits_A.is_meta:
            with torch.no_grad():
                nn.init.normal_(logits_A, 0, init_logits_std)
                nn.init.normal_(self.vblora_logits_B[adapter_name], 0, init_logits_std)

    # --- compact top-K form ---------------------------------------------------------------------

    def topk_grids(self, adapter_name: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Sub-vector grids of A ``(r, in/L)`` and B ``(out/L, r)``: the leading shapes of their top-K tensors."""
        r = self.r[adapter_name]
        length = self.vblora_vector_bank[adapter_name].shape[1]
        return (r, self.in_features // length), (self.out_features // length, r)

    def set_compact(self, adapter_name: str, tables: nn.ModuleDict, first_row: int) -> None:
        """Make ``adapter_name`` compact: its top-K rows start at ``first_row`` of ``tables[adapter_name]`` (A's
        rows then B's); dense logits, if any, are dropped."""
        self.__dict__["vblora_topk"] = tables
        self.vblora_topk_rows[adapter_name] = first_row
        self.vblora_from_topk.add(adapter_name)
        for holder in (self.vblora_logits_A, self.vblora_logits_B):
            if adapter_name in holder:
                del holder[adapter_name]

    def materialize_meta_logits(self, adapter_name: str, budget: Optional[MemoryBudget] = None) -> None:
        """Give logits left on the meta device (see ``update_layer(init_logits=False)``) real, uninitialised memory
        on the base layer's device, for a checkpoint to copy into; ``budget`` refuses what does not fit."""
        weight = getattr(self.get_base_layer(), "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")
        for key in ("vblora_logits_A", "vblora_logits_B"):
            holder = self._modules[key]
            logits = holder._parameters.get(adapter_name)
            if logits is not None and logits.is_meta:
                if budget is not None:
                    budget.take(f"logits {key[-1]}", tuple(logits.shape), logits.element_size())
                holder[adapter_name] = nn.Parameter(
                    torch.empty(logits.shape, dtype=logits.dtype, device=device), requires_grad=logits.requires_grad
                )

    def stored_topk(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices_A, weights_A, indices_B, weights_B)`` of a compact adapter as stored (PEFT's checkpoint
        tensors: indices ``(..., K)``, the first K-1 weights ``(..., K-1)``), views of the shared table."""
        table = self.vblora_topk[adapter_name]
        start = self.vblora_topk_rows[adapter_name]
        grid_A, grid_B = self.topk_grids(adapter_name)
        idx_A, w_A = compact.rows_of(table, start, grid_A)
        idx_B, w_B = compact.rows_of(table, start + grid_A[0] * grid_A[1], grid_B)
        return idx_A, w_A, idx_B, w_B

    def _materialize_logits(self, adapter_name: str) -> None:
        """Turn a compact adapter back into dense (frozen) logits, as PEFT loads a top-K checkpoint."""
        idx_A, w_A, idx_B, w_B = self.stored_topk(adapter_name)
        num_vectors = self.vblora_topk[adapter_name].num_vectors
        logits_A = topk_codec.dense_logits(idx_A, w_A, num_vectors)
        logits_B = topk_codec.dense_logits(idx_B, w_B, num_vectors)
        del self.vblora_topk_rows[adapter_name]
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_A, requires_grad=False)
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_B, requires_grad=False)


class Linear(peft_layer.Linear, VBLoRALayer):
    """VB-LoRA over a dense layer: ``nn.Linear`` or, with ``fan_in_fan_out=True``, transformers' ``Conv1D``.

    Built by PEFT's tuner as ``Linear(base_layer, bank, adapter_name, config=config, r=r)``, or by hand with the
    settings as keywords: ``Linear(base_layer, bank, adapter_name, r=4, num_vectors=64, vector_length=8, topk=2)``."""

    def __init__(
        self,
        base_layer: nn.Module,
        vblora_vector_bank: nn.ParameterDict,
        adapter_name: str,
        config: Any = None,
        r: Optional[int] = None,
        is_target_conv_1d_layer: bool = False,
        fan_in_fan_out: Optional[bool] = None,
        init_logits: bool = True,
        **kwargs: Any,
    ) -> None:
        if r is None:
            r = getattr(config, "r", None)
        settings = {k: kwargs.pop(k) for k in LAYER_FIELDS if k in kwargs}
        # nn.Module.__init__ only: the weights live in base_layer, not in this nn.Linear.
        nn.Module.__init__(self)
        VBLoRALayer.__init__(self, base_layer, **kwargs)
        if fan_in_fan_out is None:
            fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, vblora_vector_bank, r, config=config, init_logits=init_logits, **settings)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    # --- building A and B -----------------------------------------------------------------------

    def _needs_autograd(self, *tensors: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def _native(self, *tensors: torch.Tensor) -> bool:
        """Whether the Rust kernels build A and B: no autograd, CPU tensors they take, and not under torch.compile
        (an opaque extension call is a graph break; the traced torch ops are what compile wants)."""
        return not torch.compiler.is_compiling() and not self._needs_autograd(*tensors) and ops.native_ok(*tensors)

    def _get_low_rank_matrix(self, logits: torch.Tensor, vblora_vector_bank: torch.Tensor, topk: int) -> torch.Tensor:
        """``(..., num_vectors)`` logits -> ``(..., L)``: softmax over the top-K logits weighting their bank rows."""
        if logits.dtype == torch.float32 and self._native(logits, vblora_vector_bank):
            return ops.low_rank_matrix(logits, vblora_vector_bank, topk)
        top_k_logits, indices = logits.topk(topk, dim=-1)
        topk_weights = F.softmax(top_k_logits, dim=-1)
        return (topk_weights.unsqueeze(-1) * vblora_vector_bank[indices]).sum(-2)

    def _check_trainable(self, adapter: str) -> None:
        # Logits rebuilt from top-K weights are -inf outside the kept entries; training those is wrong. A
        # training-mode forward without autograd (dropout on, nothing trained) is fine, where PEFT refuses it.
        if self.training and adapter in self.vblora_from_topk and torch.is_grad_enabled():
            raise RuntimeError(TOPK_TRAINING_ERROR)

    def _lora_matrices_from_topk(self, adapter: str, cast_to_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of a compact adapter, with the indices and weights PEFT's forward would see (see ``compact``)."""
        idx_A, w_A, idx_B, w_B = self.stored_topk(adapter)
        num_vectors = self.vblora_topk[adapter].num_vectors
        if torch.compiler.is_compiling():
            idx_A, w_A = topk_codec.traceable_compute_form(idx_A, w_A)
            idx_B, w_B = topk_codec.traceable_compute_form(idx_B, w_B)
        else:
            idx_A, w_A = topk_codec.compute_form(idx_A, w_A, num_vectors)
            idx_B, w_B = topk_codec.compute_form(idx_B, w_B, num_vectors)
        bank = self.vblora_vector_bank[adapter].to(idx_A.device)
        if cast_to_fp32:
            bank = bank.float()
        if self._native(bank):
            A, B = ops.low_rank_matrices_from_topk(idx_A, w_A, idx_B, w_B, bank)
            return (A, B) if bank.dtype == torch.float32 else (A.to(bank.dtype), B.to(bank.dtype))
        w_A, w_B = w_A.to(bank.dtype), w_B.to(bank.dtype)
        A = (w_A.unsqueeze(-1) * bank[idx_A]).sum(-2).reshape(idx_A.shape[0], -1)
        B = (w_B.unsqueeze(-1) * bank[idx_B]).sum(-2).transpose(1, 2).reshape(-1, idx_B.shape[1])
        return A, B

    def _get_lora_matrices(self, adapter: str, cast_to_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (r, in)`` and ``B (out, r)`` of ``adapter``."""
        self._check_trainable(adapter)
        sharding.require_whole(self._adapter_tensors(adapter), adapter, shared_bank.of(self), "building A and B")
        if self.is_compact(adapter):
            return self._lora_matrices_from_topk(adapter, cast_to_fp32)
        logits_A = self.vblora_logits_A[adapter]
        logits_B = self.vblora_logits_B[adapter]
        if logits_A.is_meta:
            raise VBLoRAError(
                f"adapter {adapter!r} has no weights yet: it was created to be filled from a checkpoint "
                "(inference_mode=True); load its weights first"
            )
        bank = self.vblora_vector_bank[adapter].to(logits_A.device)
        topk = self.topk[adapter]
        if cast_to_fp32:
            logits_A, logits_B, bank = logits_A.float(), logits_B.float(), bank.float()
        # The kernels compute in float32: half-precision logits take PEFT's torch ops, which round at each step.
        if logits_A.dtype == torch.float32 and self._native(logits_A, logits_B, bank):
            return ops.low_rank_matrices(logits_A, logits_B, bank, topk)
        A = self._get_low_rank_matrix(logits_A, bank, topk).reshape(logits_A.shape[0], -1)
        # (out/L, r, L) -> (out/L, L, r) -> (out, r)
        B = self._get_low_rank_matrix(logits_B, bank, topk).transpose(1, 2).reshape(-1, logits_B.shape[1])
        return A, B

    def _adapter_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """The tensors A and B are built from: logits and bank, or (compact) the bank alone."""
        bank = self.vblora_vector_bank[adapter]
        if self.is_compact(adapter):
            return (bank,)
        return (self.vblora_logits_A[adapter], self.vblora_logits_B[adapter], bank)

    def _native_merge_ok(self, adapter: str) -> bool:
        return ops.native_ok(*self._adapter_tensors(adapter))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A`` of ``adapter`` (transposed for fan_in_fan_out), float32 on CPU as in PEFT."""
        params = self._adapter_tensors(adapter)
        if not self._needs_autograd(*params) and ops.native_ok(*params):
            # CPU and float32/float16/bfloat16 here: PEFT's delta is float32 in all three cases
            A, B = self._get_lora_matrices(adapter, cast_to_fp32=True)
            return ops.delta_weight(A, B, self.fan_in_fan_out)
        cast_to_fp32 = params[0].device.type == "cpu" and params[0].dtype in (torch.float16, torch.bfloat16)
        A, B = self._get_lora_matrices(adapter, cast_to_fp32)
        return transpose(B @ A, self.fan_in_fan_out)

    # --- merge ----------------------------------------------------------------------------------

    def _merge_terms(self, adapters: list[str], scale: float, safe_merge: bool = False) -> list[MergeTerm]:
        terms = []
        with torch.no_grad():
            for adapter in adapters:
                with _broken_adapter_error(adapter, safe_merge):
                    terms.append(MergeTerm(*self._get_lora_matrices(adapter, cast_to_fp32=True), scale))
        return terms

    def _apply_delta(self, adapters: list[str], scale: float, safe_merge: bool = False) -> None:
        """``weight += scale * delta`` for every adapter in ``adapters``: one Rust pass over the weight when the
        weight and the adapters are CPU tensors it takes, else PEFT's torch ops one adapter at a time."""
        weight = self.get_base_layer().weight
        native = ops.native_ok(weight.data) and all(self._native_merge_ok(a) for a in adapters)
        if not native:
            new = weight.data.clone() if safe_merge else weight.data
            for adapter in adapters:
                with _broken_adapter_error(adapter, safe_merge):
                    new += scale * self.get_delta_weight(adapter).detach()
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if safe_merge:
                weight.data = new
            return
        terms = self._merge_terms(adapters, scale, safe_merge)
        if not safe_merge:
            ops.merge_(weight.data, terms, self.fan_in_fan_out)
            return
        for adapter, term in zip(adapters, terms):
            if not (torch.isfinite(term.A).all() and torch.isfinite(term.B).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        merged = ops.merge_(weight.data.clone(), terms, self.fan_in_fan_out)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {','.join(adapters)} seems to be broken"
            )
        weight.data = merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into the base weight, all in one pass.

        With ``safe_merge`` the merge runs on a copy that is checked for non-finite values first; on failure
        a ValueError is raised and the weight is left as it was.
        """
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if self.has_adapter(a)]
        if not adapters:
            return
        self._apply_delta(adapters, 1.0, safe_merge=safe_merge)
        self.merged_adapters.extend(adapters)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        adapters = [a for a in reversed(self.merged_adapters) if self.has_adapter(a)]
        self.merged_adapters = []
        if adapters:
            self._apply_delta(adapters, -1.0)

    # --- forward --------------------------------------------------------------------------------

    def _cache_sources(self, adapter: str) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The tensors A and B of ``adapter`` are built from, and anything else they depend on."""
        modules = self._modules  # see has_adapter: no __getattr__ on the per-token path
        bank = param_of(shared_bank.of(self), adapter)
        if adapter in self.vblora_topk_rows:
            table = self.vblora_topk[adapter]
            return (table.indices, table.weights, bank), self.vblora_topk_rows[adapter]
        logits_A = param_of(modules["vblora_logits_A"], adapter)
        return (logits_A, param_of(modules["vblora_logits_B"], adapter), bank), None

    def _forward_matrices(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for the forward, from the cache while no gradient flows to them (bit-identical to a rebuild:
        the cache holds what the no-autograd path returned)."""
        self._check_trainable(adapter)
        if lora_cache.get_lora_cache_size() == 0 or torch.compiler.is_compiling():
            return self._get_lora_matrices(adapter)  # compiled graphs: no Python state, nothing to guard on
        sources, extra = self._cache_sources(adapter)
        if self._needs_autograd(*sources):
            return self._get_lora_matrices(adapter)
        cache = self._lora_cache
        entry = cache.get(adapter)
        if entry is not None and entry.valid(sources, extra):
            if len(cache) > 1:  # least recently used goes first
                cache.pop(adapter, None)
                cache[adapter] = entry
            return entry.A, entry.B
        A, B = self._get_lora_matrices(adapter)
        cache.pop(adapter, None)
        evict(cache, lora_cache.get_lora_cache_size() - 1)
        stamps = tuple(stamp(t) for t in sources)
        inference = torch.is_inference_mode_enabled()
        cache[adapter] = CachedLoRA(stamps, extra, inference, lora_cache.optimizer_steps(), A, B)
        return A, B

    def clear_lora_cache(self) -> None:
        """Drop the cached A and B of every adapter (they are rebuilt on the next forward)."""
        self._lora_cache.clear()

    def _adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``B @ A @ dropout(x)`` of one adapter; ``x`` already in the bank's dtype (as PEFT casts it)."""
        A, B = self._forward_matrices(adapter)
        dropouts = self._modules["vblora_dropout"]
        dropout = dropouts._modules.get(adapter)
        if dropout is not None:
            x = dropout(x)
        elif adapter not in dropouts:
            raise KeyError(adapter)
        # else no dropout: skip the Identity call (a module call costs microseconds, per layer and token)
        return F.linear(F.linear(x, A), B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif adapter_names is not None:
            result = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self._modules["base_layer"](x, *args, **kwargs)
            for active_adapter in self.active_adapters:
                if not self.has_adapter(active_adapter):
                    continue
                x = x.to(param_of(shared_bank.of(self), active_adapter).dtype)
                result = result + self._adapter_output(active_adapter, x)
        return result.to(previous_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Union[RowGroups, Sequence[str]], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample with its own adapter (``"__base__"``: none): one base forward for the whole batch, then per
        distinct adapter one low-rank product over its rows, added in place of ``result + delta``."""
        groups = RowGroups.of(adapter_names)
        if self.merged:
            raise VBLoRAError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        per_sample = groups.rows_per_sample(x.shape[0], "VB-LoRA layer input")
        result = self.base_layer(x, *args, **kwargs)
        single = len(groups.groups) == 1
        for name in groups.groups:
            if name == BASE_ADAPTER or not self.has_adapter(name):
                continue
            dtype = param_of(shared_bank.of(self), name).dtype
            if single:  # the whole batch: exactly the plain forward
                result = result + self._adapter_output(name, x.to(dtype))
                continue
            index = groups.index(name, per_sample, x.device)
            delta = self._adapter_output(name, x.index_select(0, index).to(dtype))
            # the same float ops per row as `result + delta` alone: promote first, then add at the rows
            result = result.to(torch.promote_types(result.dtype, delta.dtype)).index_add(0, index, delta)
        return result

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to() / .half() / .cuda(): the cached A and B are stale (the stamps would also say so, this frees them now)
        self._lora_cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles start with an empty cache (its stamps hold weak references, which do not pickle)
        state = self.__dict__.copy()
        state["_lora_cache"] = {}
        return state

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "vblora." + super().__repr__()


@contextmanager
def _broken_adapter_error(adapter: str, safe_merge: bool) -> Iterator[None]:
    """Under ``safe_merge``, a non-finite adapter found while building its matrices (a NaN logits row, say) is
    reported in PEFT's words and type first (``ValueError``: code and tests written for PEFT match on them), with
    the tensor and row at fault after."""
    try:
        yield
    except VBLoRAError as exc:
        if not safe_merge:
            raise
        raise VBLoRAError(
            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken ({exc})"
        ) from exc
