#!/usr/bin/env bash
# The GPU check: benchmarks, and the CUDA tests and the differential harness on the GPU.
# Run from the repository root on a CUDA machine whose python3 has torch, pytest, pytest-xdist
# and Lightning (transformers and peft for the language-model benchmark); results go to OUTDIR
# (default: the current directory). Exits 1 if a step failed or ran out of its time.
#
#   bash tests/benchmarks/gpu_check.sh OUTDIR          # short: about 4 minutes on an H200
#   bash tests/benchmarks/gpu_check.sh OUTDIR full     # everything: far longer
#
# The short run is what a lent GPU's 15 minutes hold: the output head with prefix and scattered
# rows at the issue's size, the language-model benchmark in bfloat16 (issue #14), a Lightning
# DeepSpeedStrategy fit and transformers.Trainer with FSDP2 (issue #19), the tests.
set -uo pipefail
out=${1:-.}
mode=${2:-short}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
# The CUDA tests, and the differential harness with every read on the GPU, in 8 processes
# (the harness alone took over 215 s in one; 91 s for both in 8 on an H200); the whole log is
# kept. pytest-benchmark (there on the lent machines) is off: under xdist it warns, which the
# project's warning filter turns into an error.
cuda_tests() {
    EMBEDDING_CONSTRAINT_TEST_DEVICE=cuda timeout "$1" python3 -m pytest -q -p no:cacheprovider \
        -p no:benchmark -n 8 -rfE --tb=short "${@:2}" tests/test_cuda.py tests/test_harness.py \
        >"$out/cuda-tests.txt" 2>&1 || failed=1
    tail -15 "$out/cuda-tests.txt"
}
# Lightning's DeepSpeedStrategy (CUDA only, so not in the CPU tests) with EmbeddingConstraint:
# ZeRO 1 to 3 fit and leave a plain module with the old rows exact (the baked weight is whole).
# Skipped where deepspeed is not installed. Its output goes to deepspeed-lightning.txt.
deepspeed_lightning() {
    python3 -c "import deepspeed" 2>/dev/null || { echo "deepspeed: not installed, skipped"; return; }
    timeout "$1" python3 - >"$out/deepspeed-lightning.txt" 2>&1 <<'PY' || failed=1
import sys

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

sys.path.insert(0, "tests")
from lightning_models import FLAVOURS, loader

flavour = FLAVOURS["lightning.pytorch"]
for stage in (1, 2, 3):
    torch.manual_seed(123)
    old = torch.nn.Embedding(6, 4)
    model = flavour.model()
    trainer = flavour.trainer(accelerator="gpu", strategy=DeepSpeedStrategy(stage=stage),
                              callbacks=[flavour.callback(model.embedding, old)])
    trainer.fit(model, loader())
    weight = model.embedding.weight
    assert type(weight) is torch.nn.Parameter, type(weight)
    assert torch.equal(weight[:6].cpu(), old.weight), "old rows moved"
    print(f"stage {stage}: fit, plain, old rows exact")
PY
    tail -4 "$out/deepspeed-lightning.txt"
}
# transformers.Trainer with accelerate's FSDP2 (`fsdp_version: 2`, each LlamaDecoderLayer its
# own group) after expand_vocabulary, under torchrun on one GPU (NCCL), a few steps of a tiny
# Llama built from a config (tests/hf_ddp_fit.py): the old rows exact in the full state dict
# and in what save_model writes (plain from_pretrained), the added rows trained; tied and
# untied, with and without `cpu_ram_efficient_loading` (all four train on 2 CPU processes,
# tests/test_hf_distributed.py). Skipped where transformers or accelerate is not installed.
# Output: hf-trainer-fsdp2.txt.
hf_trainer_fsdp2() {
    python3 -c "import accelerate, transformers" 2>/dev/null \
        || { echo "hf trainer fsdp2: transformers or accelerate not installed, skipped"; return; }
    cat >"$out/hf_trainer_fsdp2.py" <<'PY'
import sys

import torch

sys.path.insert(0, "tests")
from hf_ddp_fit import ADDED_AT, KEPT, KEPT_AT, NEW_VOCAB, OLD_VOCAB, dataset, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging

from embedding_constraint import is_fixed
from embedding_constraint.transformers import expand_vocabulary

logging.set_verbosity_error()
case, where = sys.argv[1], sys.argv[2]
tied, ram_efficient = case.startswith("tied"), case.endswith("ram-efficient")
model = tiny_llama(tied)
original = {"model.embed_tokens.weight": model.get_input_embeddings().weight.detach().clone(),
            "lm_head.weight": model.get_output_embeddings().weight.detach().clone()}
expand_vocabulary(model, OLD_VOCAB, NEW_VOCAB)
added = model.get_input_embeddings().weight.detach()[ADDED_AT].clone()
args = TrainingArguments(
    output_dir=f"{where}/{case}", max_steps=3, per_device_train_batch_size=2,
    learning_rate=0.05, weight_decay=0.1, save_strategy="no", report_to=[],
    disable_tqdm=True, seed=0, fsdp=True, ddp_timeout=60, use_cpu=not torch.cuda.is_available(),
    ddp_backend="nccl" if torch.cuda.is_available() else "gloo",
    fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                 "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                 "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                 "cpu_ram_efficient_loading": ram_efficient},
)
trainer = Trainer(model=model, args=args, train_dataset=dataset())
# On a CPU accelerate drops the FSDP plugin and runs DDP without a word: not this check.
assert trainer.accelerator.is_fsdp2, "accelerate did not run FSDP2"
trainer.train()
state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
for key in ("model.embed_tokens.weight", "lm_head.weight"):
    weight = state[key].cpu()
    assert weight.shape[0] == len(NEW_VOCAB), (key, weight.shape)
    assert torch.equal(weight[KEPT_AT], original[key][KEPT]), f"{key}: old rows moved"
embedding = state["model.embed_tokens.weight"].cpu()
assert (embedding[ADDED_AT] != added).any(dim=1).all(), "an added row did not train"
trainer.save_model(f"{where}/{case}/model")
plain = LlamaForCausalLM.from_pretrained(f"{where}/{case}/model")
assert not is_fixed(plain, "model.embed_tokens.weight")
assert torch.equal(plain.get_input_embeddings().weight.detach(), embedding)
print(f"{case}: trained, old rows exact, save_model plain")
PY
    for case in untied untied-ram-efficient tied tied-ram-efficient; do
        timeout "$1" python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
            "$out/hf_trainer_fsdp2.py" "$case" "$out/hf-trainer-fsdp2" \
            >>"$out/hf-trainer-fsdp2.txt" 2>&1 || { failed=1; echo "$case: FAILED"; }
    done
    grep -e "^untied" -e "^tied" -e FAILED -e Error "$out/hf-trainer-fsdp2.txt" | tail -6
}
# Each step runs whatever the ones before it gave; the exit status says whether any failed.
failed=0
if [ "$mode" != full ]; then
    # The benchmarks first, so that a cut-off run still leaves them. The head (V=131072,
    # d=4096, 4096 tokens): prefix and scattered against plain.
    timeout 180 python3 tests/benchmarks/bench_step.py --gpu-size --layer linear --tokens 4096 \
        --fractions 0.9 0.99 --rounds 7 --warmup 2 --no-memory \
        --json "$out/gpu-head.json" 2>"$out/bench-stderr.txt" | tee "$out/gpu-head.md" || failed=1
    # The language-model benchmark at the issue's size, bfloat16, default AdamW, every variant,
    # appended and re-sorted, tied and untied (float32 at this size needs an H200 and time).
    # Each finished cell prints a line to bench-stderr.txt.
    timeout 240 python3 tests/benchmarks/bench_lm.py --gpu-size --dtypes bfloat16 \
        --optimizers adamw --rounds 5 --warmup 2 --json "$out/gpu-lm.json" \
        2>>"$out/bench-stderr.txt" | tee "$out/gpu-lm.md" || failed=1
    grep -v -i warn "$out/bench-stderr.txt" | tail -8
    deepspeed_lightning 90
    hf_trainer_fsdp2 60
    cuda_tests 150
    exit "$failed"
fi
cuda_tests 600
deepspeed_lightning 180
hf_trainer_fsdp2 120
# Synced and pipelined step times against `free-only` (the floor), and kernel profiles.
(cd "$out" && python3 "$OLDPWD/tests/benchmarks/profile_step.py" --gpu-size --fractions 0.99 0.5 \
    2>&1 | grep -v -e USDT -e Warning -e _warn_once) || failed=1
# The main table first (it prints only when done), then torch.compile at 0.9 frozen.
python3 tests/benchmarks/bench_step.py --gpu-size --memory-jobs 4 \
    --json "$out/gpu.json" 2>"$out/bench-stderr.txt" | tee "$out/gpu.md" || failed=1
python3 tests/benchmarks/bench_step.py --gpu-size --fractions 0.9 --compile --no-memory \
    --json "$out/gpu-compile.json" 2>>"$out/bench-stderr.txt" | tee "$out/gpu-compile.md" || failed=1
# The language-model benchmark (needs transformers; peft for its column): a Llama-shaped model
# at the issue's size, every variant, layout, tying, dtype and AdamW, with the profile.
python3 tests/benchmarks/bench_lm.py --gpu-size --rounds 10 --warmup 2 --profile \
    --json "$out/gpu-lm.json" 2>>"$out/bench-stderr.txt" | tee "$out/gpu-lm.md" || failed=1
# FSDP2 on one GPU (issue #11): the constrained step against the plain one under fully_shard.
python3 tests/benchmarks/bench_distributed.py --device cuda --world 1 \
    --out "$out/gpu-fsdp2.md" --json "$out/gpu-fsdp2.json" 2>>"$out/bench-stderr.txt" || failed=1
tail -5 "$out/bench-stderr.txt"
exit "$failed"
