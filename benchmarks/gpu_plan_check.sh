#!/bin/bash
# Measured vs predicted training peak of an "8 GB" plan on a CUDA GPU (benchmarks/README.md).
# Needs medimgen installed (or on PYTHONPATH), nnU-Net, a CUDA GPU and AlexNet weights in $TORCH_HOME.
#   bash benchmarks/gpu_plan_check.sh [CONFIG_YAML] [WORKDIR]
# CONFIG_YAML: a medimgen_config.yaml planned on any machine for the same dataset recipe
# (`medimgen plan -d 501 --gpu-memory 8`); without it the plan is made here.
# The four lanes run in parallel on one GPU: each process has its own allocator, so each peak is its own
# (times per iteration are not comparable while they share the GPU).
set -u
CFG=${1:-}; W=${2:-/tmp/medimgen_gpu_check}
MM=${MEDIMGEN:-medimgen}
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res medimgen_results=$W/res
mkdir -p "$W" && cd "$W" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$MM demo-data -d 501 --name Brainish --cases 4 --shape 160,192,144 --spacing 1,1,1 >/dev/null || exit 1
nnUNetv2_plan_and_preprocess -d 501 -c 2d 3d_fullres -np 8 >/dev/null 2>&1 || { echo "nnU-Net preprocessing failed"; exit 1; }
if [ -n "$CFG" ]; then cp "$CFG" "$W/pre/Dataset501_Brainish/medimgen_config.yaml"; else $MM plan -d 501 --gpu-memory 8 --explain; fi
tr() {  # model dim lane
  mkdir -p "$W/$3" && cd "$W/$3" && $MM train "$1" 501 train-val-test "$2" --set "train_$1.epochs=1" \
    --set "train_$1.iterations_per_epoch=8" --set losses.adversarial_warmup_epochs=0 > "$W/$1_$2.log" 2>&1
  echo "$1 $2 rc=$? $(grep -h 'memory: measured' "$W/$1_$2.log")"
}
(tr ddpm 2d a) & (tr ddpm 3d b) & (tr autoencoder 2d c; tr ldm 2d c) & (tr autoencoder 3d d; tr ldm 3d d) & wait
