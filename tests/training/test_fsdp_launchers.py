"""The README's FSDP2 example through the launchers, two CPU processes: ``accelerate launch`` with
examples/fsdp/accelerate_fsdp2.yaml, and transformers' ``Trainer`` with ``fsdp=`` arguments under torchrun.

accelerate 1.15 cannot run FSDP on CPU: with ``use_cpu: true`` its launcher starts one plain process
(DistributedType.NO), and a torchrun-started CPU run is DistributedType.MULTI_CPU, where the FSDP plugin is ignored
and Trainer wraps the model in DDP. These tests run the commands as written, record which mode accelerate chose,
check the sharded state when it is FSDP, and in every mode that the run trains the adapter as one process on the
full batch does and saves a PEFT adapter that loads in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.child_process import child_env
from support.fsdp_reference import assert_adapter_matches, assert_losses_match, param_bounds, reference, tiny
from vblora_rs import PeftModel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fsdp"


def launch(command: list[str], tmp_path: Path) -> None:
    env = child_env(OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def check_run(report: dict, adapter: Path, sharded_processes: int) -> None:
    if report["distributed_type"] == "DistributedType.FSDP":
        assert report["num_processes"] == sharded_processes
        assert report["root"].startswith("FSDP") and report["bank"] == "DTensor"
    else:  # accelerate's CPU fallbacks (module docstring): no sharding, but the run must still be right
        assert not torch.cuda.is_available()
        assert report["bank"] == "Parameter"
    ref = reference()
    bounds = param_bounds(ref)
    assert_losses_match(report["losses"], ref, bounds)
    loaded = PeftModel.from_pretrained(tiny.base_model(), str(adapter))
    state = loaded.state_dict()
    assert_adapter_matches(state, ref, bounds[-1])


@pytest.mark.timeout(600)
def test_accelerate_launch_with_the_fsdp2_config(tmp_path: Path) -> None:
    config = EXAMPLE / "accelerate_fsdp2.yaml"
    assert "fsdp_version: 2" in config.read_text()
    launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
         str(EXAMPLE / "train_accelerate.py"), str(tmp_path)],
        tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "losses.json").read_text())
    if report["distributed_type"] != "DistributedType.FSDP":
        # accelerate 1.15 on CPU: `use_cpu: true` takes its single-process launcher
        assert (report["distributed_type"], report["num_processes"]) == ("DistributedType.NO", 1)
    check_run(report, tmp_path / "adapter", sharded_processes=2)


@pytest.mark.timeout(600)
def test_trainer_with_fsdp_arguments(tmp_path: Path) -> None:
    launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(EXAMPLE / "train_trainer.py"), str(tmp_path)],
        tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_processes"] == 2
    if report["distributed_type"] != "DistributedType.FSDP":
        # a CPU run is MULTI_CPU: accelerate ignores the FSDP plugin there and Trainer uses DDP
        assert (report["distributed_type"], report["root"]) == ("DistributedType.MULTI_CPU", "DistributedDataParallel")
    check_run(report, tmp_path / "adapter", sharded_processes=2)
