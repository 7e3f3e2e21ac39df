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
# DeepSpeedStrategy fit (issue #19), the tests.
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
# ZeRO 1 and 2 fit and leave a plain module with the old rows exact; ZeRO-3 is refused at setup.
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
    try:
        trainer.fit(model, loader())
    except RuntimeError as error:
        assert stage == 3 and "ZeRO stage 0, 1 or 2" in str(error), error
        print(f"stage {stage}: refused: {str(error)[:80]}")
        continue
    weight = model.embedding.weight
    assert type(weight) is torch.nn.Parameter, type(weight)
    assert torch.equal(weight[:6].cpu(), old.weight), "old rows moved"
    print(f"stage {stage}: fit, plain, old rows exact")
PY
    tail -4 "$out/deepspeed-lightning.txt"
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
    cuda_tests 150
    exit "$failed"
fi
cuda_tests 600
deepspeed_lightning 180
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
