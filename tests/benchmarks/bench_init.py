"""Measure how `expand_vocabulary`'s ``init="pieces"`` starts added tokens against ``"mean"``.

Everything is made here, with fixed seeds: a corpus of sentences from templates, two byte-level
BPE tokenizers trained on it (the old one with ``--old-vocab`` tokens, the new one with
``--new-vocab``: the same merges and more, so each added token is a merge of old pieces), and a
tiny Llama (from a config, untied head) trained on the old tokenizer's ids for
``--pretrain`` steps. Then, for each init, a copy of that model is expanded to the new tokenizer
and trained on the new tokenizer's ids (the same batches for both inits); after each count of
``--steps`` the held-out loss is recorded: on the positions whose target is an added token
(``new``), and on all positions (``all``). The table shows the median over ``--seeds`` (each
seed makes its own model, batches and init noise; the corpus and tokenizers are shared). Run
from the repository root::

    python tests/benchmarks/bench_init.py          # 5 seeds, about 30 s on 2 cores
    python tests/benchmarks/bench_init.py --quick  # smoke test
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
from typing import Any, Literal

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from embedding_constraint.transformers import expand_vocabulary

INITS: tuple[Literal["mean", "pieces"], ...] = ("mean", "pieces")
BLOCK = 32  # tokens per sequence
BATCH = 16
LR = 3e-3

# The words each template slot draws from, "|"-separated.
SLOTS = {
    "s": "the farmer|a baker|my neighbour|the teacher|our gardener|the painter|his cousin|"
    "the children|a stranger|the grocer|her grandmother|the sailor",
    "v": "picked|bought|washed|painted|counted|carried|planted|sorted|peeled|gathered|weighed|"
    "stacked|traded|polished|wrapped|shared",
    "a": "fresh|ripe|sweet|green|yellow|heavy|little|golden|crunchy|bitter|purple|speckled|"
    "wrinkled|juicy|frozen|enormous",
    "n": "apples|pears|plums|cherries|peppers|tomatoes|pumpkins|melons|lemons|carrots|potatoes|"
    "cucumbers|apricots|radishes|onions|turnips",
    "p": "in the garden|at the market|near the river|behind the barn|by the road|"
    "under the bridge|inside the kitchen|across the valley",
    "t": "this morning|yesterday|every sunday|before dinner|after the storm|last winter|"
    "during the festival",
}
TEMPLATES = [
    "{s} {v} {a} {n} {p} .",
    "{t} , {s} {v} the {a} {n} .",
    "{s} {v} {a} {n} and {a} {n} {t} .",
    "{p} , {s} {v} some {n} .",
]


def corpus(sentences: int, seed: int) -> str:
    """``sentences`` sentences from the templates, drawn with ``seed``, as one text."""
    rng = random.Random(seed)
    words = {slot: choices.split("|") for slot, choices in SLOTS.items()}
    out = []
    for _ in range(sentences):
        # Each slot is drawn anew where a template uses it twice ("{a} {n} and {a} {n}").
        template = rng.choice(TEMPLATES)
        while "{" in template:
            slot = template[template.index("{") + 1]
            template = template.replace("{" + slot + "}", rng.choice(words[slot]), 1)
        out.append(template)
    return " ".join(out)


def tokenizer(text: str, size: int) -> Any:  # transformers is partly typed
    """A byte-level BPE tokenizer of ``size`` tokens trained on ``text`` (GPT-2's scheme)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<pad>", "<eos>"], show_progress=False
    )
    bpe.train_from_iterator(text.split(" . "), trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>"
    )


def blocks(tok: Any, text: str) -> Tensor:
    """``text``'s ids in ``tok``, cut into rows of `BLOCK` tokens."""
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    return ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)


def tiny_llama(tok: Any) -> Any:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=BLOCK,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


def train(
    model: Any,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    steps: int,
    generator: torch.Generator,
) -> None:
    """``steps`` steps on batches of ``data`` drawn with ``generator``."""
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (BATCH,), generator=generator)]
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()


@torch.no_grad()
def losses(model: Any, data: Tensor, added: Tensor) -> tuple[float, float]:
    """Held-out cross-entropy on positions whose target is an added token, and on all."""
    model.eval()
    logits = model(input_ids=data).logits[:, :-1].flatten(0, 1)
    target = data[:, 1:].flatten()
    each = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    model.train()
    return float(each[torch.isin(target, added)].mean()), float(each.mean())


def run(args: argparse.Namespace) -> dict[tuple[str, int], list[tuple[float, float]]]:
    text, held_out = corpus(args.sentences, 0), corpus(args.sentences // 4, 1)
    old_tok, new_tok = tokenizer(text, args.old_vocab), tokenizer(text, args.new_vocab)
    old_ids, new_ids = old_tok.get_vocab(), new_tok.get_vocab()
    added = torch.tensor([i for t, i in new_ids.items() if t not in old_ids])
    removed = [t for t in old_ids if t not in new_ids]
    old_train, new_train = blocks(old_tok, text), blocks(new_tok, text)
    new_eval = blocks(new_tok, held_out)
    share = float(torch.isin(new_eval[:, 1:], added).float().mean())
    print(
        f"tokenizers: {len(old_tok)} -> {len(new_tok)} tokens ({len(added)} added, "
        f"{len(removed)} removed); added tokens are {share:.1%} of held-out targets"
    )
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = tiny_llama(old_tok)
        optimizer = torch.optim.AdamW(base.parameters(), lr=LR)
        train(base, optimizer, old_train, args.pretrain, torch.Generator().manual_seed(seed))
        for init in INITS:
            model = copy.deepcopy(base)
            generator = torch.Generator().manual_seed(seed)
            expand_vocabulary(model, old_tok, new_tok, init=init, generator=generator)
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)  # after expanding
            batches = torch.Generator().manual_seed(1000 + seed)  # the same for both inits
            done = 0
            for steps in sorted(args.steps):
                train(model, optimizer, new_train, steps - done, batches)
                done = steps
                results.setdefault((init, steps), []).append(losses(model, new_eval, added))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 20, 50, 100, 200])
    parser.add_argument("--pretrain", type=int, default=300, help="steps on the old tokenizer")
    parser.add_argument("--sentences", type=int, default=4000, help="sentences in the corpus")
    parser.add_argument("--old-vocab", type=int, default=200)
    parser.add_argument("--new-vocab", type=int, default=260)
    parser.add_argument("--quick", action="store_true", help="one seed, few steps: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.pretrain, args.sentences = [0], [0, 2], 5, 400
    results = run(args)
    print(
        f"{cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; seeds {args.seeds}, pretrain {args.pretrain} steps, "
        f"batch {BATCH}x{BLOCK}, AdamW lr {LR}; median over seeds; lower: the seeds where "
        "pieces' new-token loss is below mean's"
    )
    print()
    print(
        "| steps | new tokens, mean | new tokens, pieces | lower | all tokens, mean | all tokens, pieces |"
    )
    print("|---|---|---|---|---|---|")
    for steps in sorted(args.steps):
        mean, pieces = results[("mean", steps)], results[("pieces", steps)]
        lower = sum(p[0] < m[0] for m, p in zip(mean, pieces, strict=True))
        new = [statistics.median(x[0] for x in r) for r in (mean, pieces)]
        every = [statistics.median(x[1] for x in r) for r in (mean, pieces)]
        print(
            f"| {steps} | {new[0]:.3f} | {new[1]:.3f} | {lower}/{len(mean)} | {every[0]:.3f} "
            f"| {every[1]:.3f} |"
        )


def cpu() -> str:
    """The CPU's model name where Linux says it, else the platform's words."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
    except OSError:
        names = []
    return names[0] if names else f"{platform.machine()} {platform.processor()}".strip()


if __name__ == "__main__":
    main()
