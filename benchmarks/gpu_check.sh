#!/usr/bin/env bash
# The GPU checks of the quantizer, the model and the tokenization pipeline in one call, from the repository root
# (estimated at 8-10 minutes on an H100, each step writing its results as it ends; it has not run on a GPU yet):
#
#     bash benchmarks/gpu_check.sh                # results printed and written to $OUT (or benchmarks/gpu_results)
#
# Needs a CUDA build of torch, transformers and diffusers. Packages the machine lacks (diffusers, datasets,
# vector-quantize-pytorch and its dependencies) can travel as wheels in .whl/ (see benchmarks/README.md); they are
# installed into /tmp/site, nothing else on the machine changes. The package itself is used from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/gpu_results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/machine.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$RESULTS/machine.txt"

# 1. Exactness on the GPU: both modes against the float64 transcription of the original formulas with their +1e-8
#    guards (same float32 distances), and streaming == materialised.
"$PYTHON" - <<'EOF' 2>&1 | tee "$RESULTS/exactness.txt"
import torch
from optvq_hf.assignment import sinkhorn_codes
from optvq_hf.conversion.original_reference import original_indices
for num_rows, num_codes, dim in [(4096, 16384, 8), (16384, 4096, 64)]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(num_rows, dim, generator=generator).cuda()
    codes = torch.randn(num_codes, dim, generator=generator).cuda()
    expected = original_indices(rows, codes)
    found = {streaming: sinkhorn_codes(rows, codes, 10.0, 5, streaming=streaming) for streaming in (False, True)}
    print(f"N={num_rows} K={num_codes} d={dim}: differing from the guarded float64 formulas: materialised "
          f"{int((found[False] != expected).sum())}, streaming {int((found[True] != expected).sum())}")
EOF

# 2. The quantizer benchmark: default sizes, then a codebook of 65536 codes where streaming matters.
"$PYTHON" benchmarks/quantizer.py --device cuda --repeats 10 --warmup 2 \
    --methods original optvq optvq-stream log-domain log-compiled nearest previous vq-pytorch 2>&1 | tee "$RESULTS/quantizer.txt"
"$PYTHON" benchmarks/quantizer.py --device cuda --repeats 5 --warmup 1 --sizes 32768,65536,64 \
    --methods original optvq optvq-stream log-domain log-compiled nearest 2>&1 | tee -a "$RESULTS/quantizer.txt"
"$PYTHON" benchmarks/quantizer.py --device cuda --elementwise 2>&1 | tee -a "$RESULTS/quantizer.txt"

# 3. The training step, optvq against vq, at the paper's batch 8 per device, bf16 autocast: eager and compiled.
"$PYTHON" benchmarks/model.py --device cuda --step-ratio --configs small default --batch 8 --repeats 5 --bf16 2>&1 \
    | tee "$RESULTS/step_ratio.txt"
"$PYTHON" benchmarks/model.py --device cuda --step-ratio --configs default --batch 8 --repeats 5 --bf16 --compile \
    2>&1 | tee -a "$RESULTS/step_ratio.txt"

# 4. The model benchmark at batch 32: fp32, then bf16 autocast + channels-last.
"$PYTHON" benchmarks/model.py --device cuda --batch 32 --repeats 5 2>&1 | tee "$RESULTS/model.txt"
"$PYTHON" benchmarks/model.py --device cuda --batch 32 --repeats 5 --bf16 --channels_last 2>&1 \
    | tee -a "$RESULTS/model.txt"

# 5. The tokenization pipeline (examples/tokenize_dataset.py's data path, default workers, bf16 autocast) against
#    the model's eval-mode encode of the same images already on the GPU.
"$PYTHON" benchmarks/tokenization.py --repeats 3 2>&1 | tee "$RESULTS/tokenization.txt"
