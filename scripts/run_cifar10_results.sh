#!/usr/bin/env bash
# Regenerate the numbers of docs/RESULTS.md: source models, CIFAR-10-C, the TTA matrix, the
# continual-learning comparison, and the report. Run from the repository root after
# `bash scripts/install.sh`. Finished runs are found and skipped, so an interrupted call resumes.
#
#   bash scripts/run_cifar10_results.sh                 # everything, in order
#   bash scripts/run_cifar10_results.sh tta_bn report   # some sections
#
# Environment (defaults = the published protocol; docs/RESULTS.md says what each table used):
#   N_PER_DOMAIN  test images per corruption (10000 = all)   SEEDS      stream seeds (1,2,3)
#   N_GRADUAL     images per (corruption, severity) segment of the gradual ramp (N_PER_DOMAIN)
#   TTA_JOBS      parallel runs, one torch thread each (2)    OUT        results folder (outputs/results)
#   CIFAR10C      CIFAR-10-C folder (data/generated/CIFAR-10-C, written by the cifar_c section)
#   CL_TRAIN_PER_CLASS  continual section: training images per class (unset = all 5,000)
#   CL_EVAL_PERIOD      continual section: anytime accuracy every so many samples (5000)
#   PY            python (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N_PER_DOMAIN=${N_PER_DOMAIN:-10000}
SEEDS=${SEEDS:-1,2,3}
N_GRADUAL=${N_GRADUAL:-$N_PER_DOMAIN}
OUT=${OUT:-outputs/results}
CIFAR10C=${CIFAR10C:-data/generated/CIFAR-10-C}
CL_EVAL_PERIOD=${CL_EVAL_PERIOD:-5000}
export TTA_JOBS=${TTA_JOBS:-2}

BN_METHODS=source,norm,alpha_bn,unmix_tns,tent,sar,lame,unmix_tns_tent,unmix_tns_sar
FILES="dataset=cifar10c_files dataset.data_root=$CIFAR10C"

models() {  # the four source models (about an hour each on 2 CPU cores; minutes on a GPU)
  "$PY" scripts/train_source.py -m source_model=resnet26_bn,resnet26_gn,resnet26_bcn_ws,vit_small threads=1 \
    hydra/launcher=joblib hydra.launcher.n_jobs="$TTA_JOBS"
}

cifar_c() {  # CIFAR-10-C, severities 3 and 5, official layout, from the CIFAR-10 test JPEGs
  "$PY" scripts/make_cifar_c.py --out "$(dirname "$CIFAR10C")" --severities 3 5
}

bench() {  # bench <name> <overrides...>: one sweep over methods x seeds
  local name=$1; shift
  "$PY" -m benchmarks.run -m name="$name" paths.output_root="$OUT" launcher=joblib seed="$SEEDS" \
    stream.n_examples="${N_EXAMPLES:-$N_PER_DOMAIN}" "$@"
}

BN=(model=cifar10_resnet26 stream.batch_size=64 method="$BN_METHODS")
bn_reset() { bench bn_reset experiment=cifar10c_reset $FILES "${BN[@]}"; }
bn_continual() { bench bn_continual experiment=cifar10c_continual $FILES "${BN[@]}"; }
bn_mixed() { bench bn_mixed experiment=cifar10c_mixed $FILES "${BN[@]}"; }
bn_dirichlet() { bench bn_dirichlet experiment=cifar10c_noniid $FILES "${BN[@]}" stream.delta=1,0.1,0.01; }
bn_sorted() { bench bn_sorted experiment=cifar10c_continual $FILES "${BN[@]}" stream.label_order=sorted; }
# the gradual ramp visits severities 1..5..1: corrupted on the fly (8-bit, identical to the files)
bn_gradual() { N_EXAMPLES=$N_GRADUAL bench bn_gradual experiment=cifar10c_continual "${BN[@]}" stream.schedule=gradual; }

bn_severity3() { bench bn_severity3 experiment=cifar10c_continual $FILES "${BN[@]}" 'stream.severities=[3]'; }

tta_bn() {  # ResNet-26 + BN: every setting at batch 64, severity 5 (and the continual stream at severity 3)
  bn_reset; bn_continual; bn_mixed; bn_dirichlet; bn_sorted; bn_gradual; bn_severity3
}

bn_long() {  # longer streams (N_LONG images per corruption): methods whose state builds up slowly
  N_EXAMPLES=${N_LONG:-$N_PER_DOMAIN} bench bn_long experiment=cifar10c_continual $FILES model=cifar10_resnet26 \
    stream.batch_size=64 method=source,norm,unmix_tns,tent,lame stream.label_order=iid,sorted
}

tta_bn_small_batches() {  # ResNet-26 + BN, continual i.i.d. stream, batch 16 and 1
  bench bn_batch16 experiment=cifar10c_continual $FILES model=cifar10_resnet26 stream.batch_size=16 method="$BN_METHODS"
  bench bn_batch1 experiment=cifar10c_continual $FILES model=cifar10_resnet26 stream.batch_size=1 \
    method=source,alpha_bn,unmix_tns,tent,sar
}

tta_gn() {  # ResNet-26 + GroupNorm: the entropy methods where statistics methods do not apply
  local common=(model=cifar10_resnet26_gn method=source,tent,sar,lame)
  bench gn_continual experiment=cifar10c_continual $FILES "${common[@]}" stream.batch_size=64,1
  bench gn_mixed experiment=cifar10c_mixed $FILES "${common[@]}" stream.batch_size=64
  bench gn_sorted experiment=cifar10c_continual $FILES "${common[@]}" stream.batch_size=64 stream.label_order=sorted
}

tta_bcn() {  # ResNet-26 + BCN/WS
  bench bcn_continual experiment=cifar10c_continual $FILES model=cifar10_resnet26_bcn_ws stream.batch_size=64 \
    method=source,bcn,tent stream.label_order=iid,sorted
}

tta_vit() {  # the small ViT (LayerNorm)
  bench vit_continual experiment=cifar10c_continual $FILES model=cifar10_vit_small stream.batch_size=64 \
    method=source,tent,sar,lame stream.label_order=iid,sorted
}

continual() {  # online class-incremental CIFAR-10: BN vs AdaB2N vs BCN+WS, Naive and ER, Split and Si-Blurry
  for scenario in split si_blurry; do
    for strategy in er naive; do
      "$PY" -m continual.experiments.compare_norms --benchmark cifar10 --norms bn adab2n bcn_ws \
        --strategy "$strategy" --scenario "$scenario" --seeds 0 1 2 --test-per-class 300 --eval-period "$CL_EVAL_PERIOD" --mem-size 500 \
        ${CL_TRAIN_PER_CLASS:+--train-per-class "$CL_TRAIN_PER_CLASS"} --threads 1 \
        --out "$OUT/continual/${scenario}_${strategy}${CL_TRAIN_PER_CLASS:+_${CL_TRAIN_PER_CLASS}pc}.json"
    done
  done
}

report() {
  for dir in "$OUT"/*/; do
    case "$dir" in */continual/|*/report/) continue ;; esac
    "$PY" -m benchmarks.report "$dir" --quiet
  done
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(models cifar_c tta_bn bn_long tta_bn_small_batches tta_gn tta_bcn tta_vit continual report)
for section in "${sections[@]}"; do
  echo "== $section"
  "$section"
done
