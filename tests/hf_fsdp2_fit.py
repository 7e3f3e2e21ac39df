"""accelerate's FSDP2 preparation of a tiny Llama after `expand_vocabulary`, one rank of ``torchrun``.

Run by tests/test_hf_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_fsdp2_fit.py --out DIR``
(gloo on the CPU, a 60 s process-group timeout). accelerate refuses an FSDP plugin on the CPU,
so its Accelerator is not made: each rank calls ``accelerate.utils.fsdp_utils.fsdp2_prepare_model``
itself, with a `FullyShardedDataParallelPlugin` (``fsdp_version=2``, each decoder layer sharded
by the transformer auto-wrap policy) and the few fields of an Accelerator that function reads.

Cases (`CASES`), each rank preparing the model, training a few steps on its own batches and
writing ``{case}-rank{r}.pt`` (its full state dict, which every rank gathers, and its vocabulary
matrices after expanding); rank 0 then saves the model as the Trainer does under FSDP2
(accelerate's ``get_state_dict`` options, then ``save_pretrained(state_dict=...)``) to
``DIR/{case}``:

- ``untied``; ``tied``: tied, left to accelerate (which finds the tie by
  ``input_embed.weight is output_embed.weight``, true of a tie's reads, `shared_read`, and shards
  the two as one group); ``tied-pair``: tied, the embedding and the head sharded as one group
  before accelerate runs, by hand.
- ``*-ram-efficient``: ``cpu_ram_efficient_loading``; the added rows start apart on each rank,
  so only rank 0's weights reaching rank 1 makes the ranks equal.
- ``untied-mixed``: the plugin's ``MixedPrecisionPolicy`` (bfloat16 parameters in the forward,
  float32 gradient reduction); ``tied-offload``: its ``CPUOffloadPolicy``.

A failed case writes ``{case}-rank{r}.err``; the ranks go on to the next case if they failed
alike, and stop otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).parent))

from hf_ddp_fit import NEW_VOCAB, OLD_VOCAB, STEPS, TIMEOUT_S, dataset, tiny_llama, vocab_tensors

# name: (tied, the tied pair sharded as one group before accelerate, cpu_ram_efficient_loading).
CASES = {
    "untied": (False, False, False),
    "tied-pair": (True, True, False),
    "untied-ram-efficient": (False, False, True),
    "tied": (True, False, False),
    "tied-ram-efficient": (True, False, True),
    "untied-mixed": (False, False, False),
    "tied-offload": (True, False, False),
}
# The plugin's mixed precision and CPU offload, for the cases named after them.
PLUGIN_OPTIONS: dict[str, dict[str, Any]] = {
    "untied-mixed": {
        "mixed_precision_policy": MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    },
    "tied-offload": {"cpu_offload": CPUOffloadPolicy(pin_memory=False)},
}


def accelerator(plugin: Any, rank: int) -> SimpleNamespace:
    """What `fsdp2_prepare_model` and `fsdp2_load_full_state_dict` read of an Accelerator."""
    return SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        is_main_process=rank == 0,
        device=torch.device("cpu"),
        mixed_precision="no",
        torch_device_mesh=None,
    )


def model_of_rank(tied: bool, ram_efficient: bool, rank: int) -> Any:
    """The same pretrained model on every rank; under ``cpu_ram_efficient_loading`` the added
    rows start apart on each rank (a seed per rank), so that only rank 0's can reach the others.

    (``from_pretrained`` under that option leaves the other ranks on the meta device, where
    `expand_vocabulary` refuses: it needs the old rows' values.)
    """
    from embedding_constraint.transformers import expand_vocabulary

    model = tiny_llama(tied)
    torch.manual_seed(rank if ram_efficient else 0)
    return expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)


def fit(out: Path, case: str, rank: int) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    tied, pair, ram_efficient = CASES[case]
    model = model_of_rank(tied, ram_efficient, rank)
    expanded = vocab_tensors(model)
    if pair:
        # As a user who shards the tied pair before accelerate runs would.
        fully_shard([model.get_input_embeddings(), model.get_output_embeddings()])
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        cpu_ram_efficient_loading=ram_efficient,
        state_dict_type="FULL_STATE_DICT",
        **PLUGIN_OPTIONS.get(case, {}),
    )
    model = fsdp2_prepare_model(accelerator(plugin, rank), model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    examples = dataset()
    for step in range(STEPS):
        batch = examples[2 * (2 * step + rank) : 2 * (2 * step + rank) + 2]  # each rank its own
        ids = torch.stack([example["input_ids"] for example in batch])
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().clone() for k, v in full.items() if isinstance(v, Tensor)}
    # The Trainer's save under FSDP2: accelerate's get_state_dict, then save_pretrained.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    saved = get_model_state_dict(model, options=options)
    if rank == 0:
        model.save_pretrained(str(out / case), state_dict=saved)
    torch.save({"expanded": expanded, "state": state}, out / f"{case}-rank{rank}.pt")


def _alike(result: str) -> bool:
    """Whether every rank ended the case the same way (one small collective), so the next
    case starts together; False if that collective fails too."""
    try:
        every: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(every, result)
    except Exception:  # noqa: BLE001  # the group is broken: a rank timed out or left
        return False
    return all(r == result for r in every)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    for case in CASES:
        try:
            fit(args.out, case, rank)
            result = "ok"
        except Exception as error:  # noqa: BLE001  # the test shows what failed
            result = traceback.format_exception_only(error)[-1].strip()[:400]
            (args.out / f"{case}-rank{rank}.err").write_text(result)
            traceback.print_exc()
        if not _alike(result):
            os._exit(1)  # the ranks are apart: a later case would fail for that reason
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
