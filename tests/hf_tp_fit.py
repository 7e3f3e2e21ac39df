"""Hugging Face tensor parallelism (``from_pretrained(..., tp_plan="auto")``), one rank of ``torchrun``.

Run by tests/test_hf_distributed.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_tp_fit.py --out DIR``
(transformers starts the gloo group on the CPU). The order that ``tp_plan`` imposes: the
vocabulary is expanded on one process and saved (`expand_vocabulary`, then ``save_pretrained``),
the expanded checkpoint is loaded sharded by vocabulary, and only then are the old rows held
fixed (`fix_rows` on the shards). For an untied and a tied model, each rank trains a few steps on the whole batch (the
ranks of a tensor-parallel group see one batch), saves ``DIR/{case}/rank{r}.pt`` (the full
state after training) and ``save_pretrained`` writes ``DIR/{case}/model``. `train` is the loop the test runs on one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from embedding_constraint import fix_rows

STEPS = 3


CASES = {"untied": False, "tied": True}  # Hugging Face's tp_plan keeps a tied head tied


def expanded(path: Path, tied: bool) -> Path:
    """Save the tiny Llama grown to the new vocabulary at ``path``, in one process."""
    from hf_ddp_fit import NEW_VOCAB, OLD_VOCAB, tiny_llama

    from embedding_constraint import bake
    from embedding_constraint.transformers import expand_vocabulary

    model = bake(expand_vocabulary(tiny_llama(tied), OLD_VOCAB, NEW_VOCAB))
    model.save_pretrained(path)  # type: ignore[operator]  # transformers: partly typed
    return path


def constrain(model: Any, tied: bool) -> None:
    """Hold the old tokens' rows of the input embedding and the head at the old model's (a
    tied head reads the embedding's)."""
    from hf_ddp_fit import KEPT, KEPT_AT, tiny_llama

    old = tiny_llama(tied)
    names = (
        ["model.embed_tokens.weight"] if tied else ["model.embed_tokens.weight", "lm_head.weight"]
    )
    for name in names:
        reference = old.get_parameter(name).detach()[KEPT]
        fix_rows(model, reference, name=name, rows=KEPT_AT)


def train(model: Any) -> list[float]:
    """A few AdamW steps on fixed batches; the losses."""
    from hf_ddp_fit import dataset

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ids = torch.stack([example["input_ids"] for example in dataset()])
    losses = []
    for batch in torch.split(ids, 4)[:STEPS]:
        optimizer.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def full_state(model: Any) -> dict[str, Tensor]:
    """The model's state dict, each sharded tensor gathered whole (every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for key, value in model.state_dict().items()
    }


def main() -> None:
    import argparse

    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    rank = int(os.environ["RANK"])
    # Each rank its own copy, written before transformers starts the process group (after it,
    # only rank 0 writes): no rank waits for another's.
    sources = {
        case: expanded(out / case / f"expanded-rank{rank}", tied) for case, tied in CASES.items()
    }
    for case, tied in CASES.items():
        model = LlamaForCausalLM.from_pretrained(sources[case], tp_plan="auto")
        constrain(model, tied)
        head: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        embedding: Any = model.get_input_embeddings()
        result: dict[str, Any] = {
            "sharded": type(embedding.weight).__name__,
            "losses": train(model),
        }
        result["trained"] = full_state(model)
        model.save_pretrained(out / case / "model")
        result["still_tied"] = (
            head.parametrizations.weight is embedding.parametrizations.weight if tied else None
        )
        torch.save(result, out / case / f"rank{rank}.pt")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
