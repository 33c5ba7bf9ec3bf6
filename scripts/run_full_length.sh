#!/usr/bin/env bash
# Issue 26: the full-length CIFAR-10-C streams of docs/RESULTS.md ("Full-length continual
# CIFAR-10-C", "Full-length mixed domains", "Compute-aware evaluation at full length"): all
# 10,000 test images under each of the 15 corruptions at severity 5 (150,000 images per run),
# corrupted on the fly, the committed BN ResNet-26 (weights/cifar10_resnet26.pt; the GN one,
# weights/cifar10_resnet26_gn.pt, for the correlated setting), seed 1.
#
#   bash scripts/run_full_length.sh                          # every section
#   bash scripts/run_full_length.sh continual_batch64 mixed   # some sections
#
# The method lists are the rows of docs/RESULTS.md's tables. Finished runs are skipped, so an
# interrupted call resumes. A run takes 5 (statistics methods) to 25 minutes (sar) on one
# core (rotta 28 to 100, checkpointed in its own sections); cotta would take about 3.5 hours.
# Environment: OUT (outputs/full_length), TTA_JOBS (parallel runs, one torch thread each;
# 1), PY, and one variable per section
# that replaces its method list (CONTINUAL_200, CONTINUAL_64, MIXED_200, CORRELATED_GN,
# COMPUTE_AWARE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/full_length}
export TTA_JOBS=${TTA_JOBS:-1}
export OMP_NUM_THREADS=1

run() {  # run <name> <methods> <overrides...>
  local name=$1 methods=$2; shift 2
  "$PY" -m benchmarks.run -m name="$name" paths.output_root="$OUT" launcher=joblib runtime.num_threads=1 \
    model="${MODEL:-cifar10_resnet26}" seed=1 method="$methods" "$@"
}

continual_batch200() {
  run continual_batch200 "${CONTINUAL_200:-source,norm,tent,eta,lame,roid,cmf,sar,deyo,rbn,balanced_bn,rotta,follow}" \
    experiment=cifar10c_continual
}
# petta's divergence sensing reads 1,000 labelled training images (method.source_images); it
# checkpoints every 25 batches, so an interrupted call resumes mid-stream (28 minutes on one
# core)
continual_batch200_petta() {
  run continual_batch200 petta experiment=cifar10c_continual method.source_images=1000 runtime.checkpoint_every=25
}
# rotta takes 28 (mixed, alone) to 100 minutes (continual, beside other runs) on one core:
# these two sections checkpoint every 25 batches, so that an interrupted call resumes
# mid-stream (runtime keys are not part of a run's identity)
continual_batch64_rotta() {
  run continual_batch64 rotta experiment=cifar10c_continual stream.batch_size=64 runtime.checkpoint_every=25
}
mixed_rotta() {
  run mixed_batch200 rotta experiment=cifar10c_mixed runtime.checkpoint_every=25
}
continual_batch64() {
  run continual_batch64 "${CONTINUAL_64:-source,norm,lame,tent,eta,roid,rbn,balanced_bn,sar,cmf,deyo,follow}" \
    experiment=cifar10c_continual stream.batch_size=64
}
mixed() {
  run mixed_batch200 "${MIXED_200:-source,norm,eta,lame,roid,cmf,deyo,tent,sar,follow}" experiment=cifar10c_mixed
}
# The published "correlated" setting (mariodoebler/test-time-adaptation: the continual stream
# sorted by class, batch 200) is on a GroupNorm ResNet-26: the committed one here.
correlated_gn() {
  MODEL=cifar10_resnet26_gn run correlated_gn_batch200 "${CORRELATED_GN:-source,lame,roid,tent,eta,sar,follow}" \
    experiment=cifar10c_continual stream.label_order=sorted
}
# The stream arrives at the speed of plain inference (eta 1); each method's step cost is
# measured on every adapting batch against the source model in the same process, as the
# official code does (one thread per run; the unconstrained errors are continual_batch200's).
compute_aware() {
  run continual_batch200_online_eta1 "${COMPUTE_AWARE:-source,norm,tent,eta,roid,lame,rbn,balanced_bn,follow,cmf}" \
    experiment=cifar10c_continual eval.online_eta=1.0
}

SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(continual_batch200 continual_batch200_petta continual_batch64 continual_batch64_rotta mixed mixed_rotta correlated_gn compute_aware)
for section in "${SECTIONS[@]}"; do "$section"; done
