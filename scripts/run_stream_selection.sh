#!/usr/bin/env bash
# Issue 25: choose a default that follows the stream, the same way as issue 14's selection
# (scripts/run_selection.sh): development streams choose the hyperparameters of the new
# method `follow` and the `auto` rule; evaluation streams, declared here before any run,
# only score. docs/RESULTS.md ("A default that follows the stream") has the results.
#
#   bash scripts/run_stream_selection.sh                    # everything
#   bash scripts/run_stream_selection.sh dev_bn select_bn   # some sections
#
# Needs nothing but the committed source models (weights/) and the shared CIFAR-10 JPEGs:
# every stream is corrupted on the fly. Finished runs are skipped, so an interrupted call
# resumes. Environment: OUT (outputs/stream_selection), TTA_JOBS (parallel runs, one torch
# thread each; 1), PY.
#
# DECLARED on 2026-12-07 at 08:33 UTC (commit aa1b69e), before any run of this selection
# except two probes on the seed-1 i.i.d. development stream (norm; source, norm and
# balanced_bn outputs for the replay below). Models: the committed
# BN ResNet-26 (weights/cifar10_resnet26.pt, 86.46 % clean), the committed GN ResNet-26
# (weights/cifar10_resnet26_gn.pt, 79.10 %), the digits BN CNN of this machine's cache
# (experiment=digits_quick) and, if it finishes training in this session, the small ViT.
# Severity 5, batch 64, 300 images per corruption unless said.
#
# * Development streams (they choose): BN ResNet-26, seed 1: continual i.i.d., class-sorted,
#   Dirichlet 0.1, RoTTA's class-temporal order (gamma 0.1) at 300; class-sorted at 2,000;
#   class-sorted at batch 16. Digits, seed 0: i.i.d. and class-sorted. GN ResNet-26, seed 1:
#   i.i.d. and class-sorted. The hyperparameters of `follow` are chosen by replaying its
#   detector over per-batch outputs recorded on these streams only.
# * Evaluation streams (they only score): BN ResNet-26, seed 2: continual i.i.d., class-sorted,
#   Dirichlet 0.01, mixed domains, severity 3, i.i.d. at batch 16, all at 300; i.i.d.,
#   class-sorted and global imbalance (factor 10 under Dirichlet 0.1) at 2,000; PeTTA's
#   recurring stream (20 visits, class-temporal, 334 per corruption: 100,200 images); a
#   CCC-style walk (target source accuracy 0.4, 100 steps of 1,000: 100,000 images). Digits,
#   seed 1, batch 16: i.i.d. and Dirichlet 0.1; and the README demo (benchmarks.demo,
#   seed 1). GN ResNet-26, seed 2: i.i.d., class-sorted, Dirichlet 0.01, i.i.d. at batch 16.
#   The ViT, if trained: seed 2 i.i.d. and class-sorted (dev for it: seed 1, the same two).
# * Criterion, as issue 14: at most 0.5 points above `source` on every development stream,
#   then the smallest largest regret to the best method of the pool. Acceptance on the
#   evaluation streams: never more than 0.5 points above `source` (required); on the recurring
#   stream the last visit at most 1 point above the first (required); within 2 points of the
#   best method of the pool (target); the demo: `auto` within 2 points of the best on i.i.d.
#   and better than `source` on class-sorted.
# * Pools: BN: the methods of the library that apply to BatchNorm and run in the app at
#   affordable cost; the 100,000-image streams run LONG_POOL (cost). GN: GN_POOL.
#
# AMENDED at 08:45 UTC (commit 9856d7f), before any evaluation run and before any pool run on the development
# streams: the hyperparameters of `follow` (z_threshold 5, concentration 0.4, hold 2048) were
# chosen by replaying its detector over the per-batch outputs of source, norm and balanced_bn
# recorded on the development streams above plus two more seed-1 streams, which join the
# development set: i.i.d. at batch 16 and class-sorted at 2,000 per corruption at batch 200
# (class runs aligned with the batches: every batch holds one class). Grid: z_threshold
# 4/5/6/8, hold 1024/2048/4096, concentration 0.4/0.5/0.6; criterion as above (feasible, then
# the smallest largest regret to the better of norm and balanced_bn, then the mean).
# For compute, the batch-16 streams run BATCH16_POOL (BN_POOL without rotta, tribe and cmf).
#
# AMENDED again at 08:52 UTC (commit 445a3ec), before any evaluation run: `follow` got a third
# alarm, a homogeneity test between consecutive batches' labels (shift_z 3, shift_batches 3),
# after a check on streams the repository does not generate (the development streams with
# every batch shuffled inside: the run test is blind there and follow fell to test-time BN,
# 58.7 % against 40.6 % for source on the shuffled sorted stream). shift_batches 3 over 2 and
# shift_z 3 over 2 and 4: equal on the development replays; 3 in a row is what a single
# domain change cannot produce. Its development runs from before that commit were deleted and
# run again. Also for compute: the two 100,000-image evaluation streams run LONG_EVAL_POOL.
#
# AMENDED at 09:03 UTC, for compute (two cores, the session's end), before any evaluation
# run: the 300-image BN evaluation streams run EVAL_POOL (BN_POOL without alpha_bn,
# unmix_tns, gated_bn and cmf, never the best method of a stream in docs/RESULTS.md, and
# tribe, 9x the cost of plain inference); the 2,000-image ones EVAL_2000_POOL; the CCC walk
# is 50 steps of 1,000 (50,000 images); the GN evaluation streams run GN_EVAL_POOL (GN_POOL
# without tent, deyo and cmf: tent and deyo were 15-30 points above source on the GN
# streams of docs/RESULTS.md, cmf within 0.1 of roid) and the GN batch-16 stream is dropped.
#
# AMENDED at 09:44 UTC, for compute, before any run of the 2,000-image, 100,000-image, CCC,
# GN-evaluation or ViT streams (a progress check at 09:26 had printed the finished sorted
# 300-image evaluation runs of tent, eta, roid, lame, rbn and balanced_bn; nothing was changed
# on account of them): LONG_EVAL_POOL drops rotta; the CCC walk is 25 steps of 1,000
# (25,000 images); EVAL_2000_POOL drops rbn; the GN Dirichlet evaluation stream is dropped;
# the ViT runs VIT_POOL source, sar, lame, follow.
#
# AMENDED at 10:35 UTC, before any CCC result: the CCC walk as declared (target source accuracy
# 0.4) cannot be built for this model: its calibration table offers one state within 0.1 of
# 40 % accuracy (impulse_noise), the walk needs two. The walk targets 0.6, about the source
# model's mean accuracy at severity 5 (the CCC paper's targets are set for ImageNet models).
#
# SECOND SELECTION, DECLARED on 2026-12-07 at 11:20 UTC (828127b), before any run of it:
# it chooses a fix of `follow` for two failures found by the first selection (aligned
# one-class batches: the full-length class-sorted stream at batch 200, 62.61 % against 40.43 %
# for source; false alarms of the class-switch rule at batch 16 on digits).
# * Development streams (they choose): the first selection's development streams, plus three
#   whose figures were already seen: class-sorted at 10,000 per corruption, batch 200, seed 1
#   (every batch one class, runs aligned to the batches); digits, seed 0, batch 16: i.i.d.
#   and Dirichlet 0.1 (pool BATCH16_POOL; on the full-length stream only follow runs, for
#   compute: the other methods' seed-1 errors are docs/RESULTS.md's). Changes to follow's detector are chosen by replaying it over per-batch
#   outputs recorded on these streams only (the class-balanced and the test-batch forwards,
#   which no detector decision changes; and the batch moments of the first and last BN
#   layers), with the first selection's criterion.
# * Evaluation streams (they only score): the first selection's evaluation streams, on which
#   only the fixed `follow` runs: every other method's code is unchanged since, and a run is
#   deterministic on the CPU, so their errors are the first selection's (docs/RESULTS.md;
#   `norm` on the i.i.d. stream is rerun to check that). New: class-sorted at 10,000 per
#   corruption, batch 200, seed 2 (FULL_SORTED_POOL), and the same at batch 100, seed 2
#   (every batch one class, ten per class; FULL_SORTED_POOL).
#   AMENDED at 11:28 UTC (0579f04), after source's run on the first new stream and before any other
#   result: both new evaluation streams draw their corruptions with stream.corruption_seed=2.
#   The run seed only orders the images, so every stream above (the first selection's too)
#   shares corruption seed 0 with its development twin; seed 2 makes these two new draws.
#   AMENDED at 11:35 UTC (ae8fa1f), before any run or replay on them: digits i.i.d. at batch 16 with seeds 2
#   and 3 join the development streams (seed 0 shows no false alarm of the class-switch rule;
#   the failure was seen on the evaluation seed 1, which stays evaluation only).
#   AMENDED at 11:59 UTC (d213d57), after the replay grid (now python -m benchmarks.follow_replay) on the
#   development streams and before any
#   evaluation run of the fixed follow: the grid (a class switch also needs the homogeneity
#   z between the two batches above switch_shift_z 3/5/8/12/20; concentration
#   0.1/0.15/0.2/0.25/0.3/0.4; memory of the last concentrated class 0/512/1024/2048 samples;
#   hold 2048/4096) has its largest regret on the full-length stream (6.75 to 7.5 points
#   behind lame, whose output correction beats the prior correction on one-class batches
#   whatever the detector does: 22.36 % with every batch counted correlated), where the
#   candidates differ by under 0.5 points while they differ by up to 4 points on i.i.d.
#   streams. The criterion becomes: feasible, then a largest regret within 0.5 points of the
#   smallest, then the smallest mean regret. Chosen: switch_shift_z 5, concentration 0.15,
#   no memory, hold 4096 (largest regret 7.21, mean 1.09; the first selection's follow 11.68
#   and 1.43 on these streams).
# * Acceptance: the first selection's, plus on the two new streams: never more than 0.5
#   points worse than source (required).
#
# THIRD SELECTION, DECLARED on 2026-12-07 at 17:41 UTC, before any evaluation run of it: it
# chooses `follow`'s restart_shift (a restart of its class-balanced statistics from the
# source statistics when the log variance per channel of the first BN layer's input jumps
# between consecutive batches: a label-free signal of a domain change), for the one required
# criterion still missed (recurring stream: last visit 1.74 points above the first, 1 allowed),
# diagnosed on development streams only (docs/RESULTS.md, "Where the recurring stream's
# first-visit advantage comes from"). Two probes of the mechanism (a script, thresholds 0.3
# and 0.4) ran on the two new development streams below before this declaration.
# * Development streams (they choose): the second selection's, plus the two on which the
#   diagnosis was made: PeTTA's recurring order at 334 per corruption, 5 visits, batch 64,
#   seed 1, corruption seed 1 (25,050 images); and class-sorted, batch 200, seed 1, all
#   10,000 images of defocus_blur, gaussian_noise, shot_noise, contrast (every batch one
#   class; 40,000 images). Grid: restart_shift off, 0.3, 0.4, 0.5, 0.6. The signal depends
#   on the images alone, so where a value never fires on a stream (computed exactly from
#   the recorded signal, `python -m benchmarks.follow_replay signal`) its run equals the run
#   without restarts and is not repeated.
# * Criterion: the second selection's (at most 0.5 points above source on every development
#   stream; then a largest regret within 0.5 points of the smallest, then the smallest mean
#   regret), and feasible only if the recurring development stream's last visit is at most 1
#   point above its first.
# * Evaluation streams (they only score): every evaluation stream of the second selection
#   (BN, digits, demo; the GN and ViT models have no BN layer to restart and their runs are
#   unchanged), on which only the chosen `follow` runs; the other methods'
#   errors are those of the first two selections. Acceptance: as before.
# RESULT, 18:40 UTC, from the development streams alone: no restart (restart_shift None, the
#   default) has the smallest largest regret (7.21 points, on the full-length one-class
#   stream; 0.5: 7.72, 0.4: 8.02, 0.3: 8.81) and the smallest mean regret (0.914); 0.6 is
#   infeasible (recurring twin +1.16). The chosen follow is the one already scored on the
#   evaluation streams, so none was run. docs/RESULTS.md, "Third selection".
#
# FOURTH SELECTION, DECLARED on 2026-12-07 at 20:35 UTC, before any evaluation run of it: it
# chooses how `follow` restarts, for the recurring criterion still missed (0.74). The third
# selection showed that the two kinds of correlated stream want different restarts: from the
# source statistics where batches hold several classes (recurring twin 32.04 -> 31.29 % at
# 0.5), keeping each class's offset where every batch holds one class (class-sorted 2,000:
# 11.53 -> 10.63 %). New option recentre_agreement: a restart recentres (the global statistics
# become the source's, each class keeps its offset) while the running agreement between the
# class-balanced and the test-batch predictions is at or below it (one-class batches, whose
# own statistics remove the class: median 0.31-0.37 on the one-class development streams,
# 0.61-0.66 on the Dirichlet and recurring ones), and restarts from the source statistics
# above it. Probes of it (a script; restart_shift 0.5, share 0.5) ran before this declaration
# on four development streams: recurring twin, class-sorted 2,000, one-class four corruptions,
# class-sorted all 10,000 at batch 200.
# * Development streams (they choose): the third selection's 17. Grid: the third selection's
#   candidates with their figures (off, restart_shift 0.3/0.4/0.5/0.6 from the source
#   statistics), plus restart_shift 0.4 and 0.5 each with recentre_agreement 0.5
#   (agreement_rate 0.1).
# * Criterion: the third selection's (at most 0.5 points above source on every development
#   stream; the recurring twin's last visit at most 1 point above its first; a largest regret
#   within 0.5 points of the smallest; then the smallest mean regret).
# * Evaluation streams (they only score): those of the third selection (every BN and digits
#   evaluation stream of the second; the demo), on which only the chosen `follow` runs, if it
#   is not the one already scored; the other methods' errors are the earlier selections'.
#   Acceptance: as before.
# RESULT, 21:20 UTC, from the development streams alone: restart_shift 0.4 with
#   recentre_agreement 0.5. Every candidate is within 0.5 points of source everywhere; both
#   new ones pass the recurring check (last visit minus first: -0.06 at 0.4, -0.30 at 0.5).
#   Largest regret (full-length one-class stream, behind lame): 0.4+recentre 5.59, 0.5+recentre
#   6.10 (0.51 above: out), off 7.21, the restarts from source 7.72-8.81; mean regret 0.823
#   (off 0.914). The evaluation runs: CHOSEN's default below, section eval4.
#
# FIFTH SELECTION, DECLARED on 2026-12-07 at 23:57 UTC, before any run of it: it chooses
# where `follow`'s restart signal reads the images, for the recurring criterion still missed
# (1.04: a restart fires at 151 of the 299 domain changes, so a visit's error depends on which
# ones fire). Probes on development streams only (scripts outside the library: the per-layer
# test-batch statistics of the source model), before this declaration: the first layer's
# log-variance change separates only half of the recurring twin's domain changes from the
# changes inside a domain (46 of 74 at 0.4, the largest within-domain change 0.35 to 0.48);
# averaged over every BatchNorm layer's input in the test-batch forward, 57 of 74 exceed the
# largest within-domain change of the development streams measured (0.139: class-sorted at
# batch 16; measured: the recurring twin and the 300-image i.i.d., class-sorted, Dirichlet,
# class-temporal and batch-16 class-sorted streams and class-sorted 2,000); 9 of the 15 kinds
# of change, the wrap-around among them, exceed 0.14 in every visit (the first layer at 0.4:
# 6). New option restart_signal=all_layers (the test-batch forward runs first and gives the
# signal).
# * Threshold, fixed by a rule on the signal alone: the smallest 0.01 step above the largest
#   within-domain change on those development streams (0.139, so 0.14).
# * Development streams (they choose): the fourth selection's 17. Candidates: the fourth
#   selection's choice (restart_shift 0.4 on the first layer, its figures) and
#   restart_signal=all_layers with restart_shift 0.14 (recentre_agreement 0.5 for both).
# * Criterion: the fourth selection's.
# * Evaluation streams (they only score): the fourth selection's (section eval5), only if the
#   new candidate is chosen. Acceptance: as before.
# RESULT, 00:22 UTC, from the development streams alone: the fourth selection's follow stays.
#   Every layer at 0.14 is better on 10 of the 11 CIFAR-10-C streams (recurring twin 30.11 ->
#   28.79, last visit 0.60 below the first; largest regret 5.59 -> 5.13), but infeasible:
#   digits class-sorted 21.72 %, 0.64 above source (the digits model's class changes move its
#   deeper layers as much as a corruption change); its mean regret is also higher (0.909
#   against 0.823). eval5 was not run. docs/RESULTS.md, "Fifth selection".
#
# SIXTH SELECTION, DECLARED on 2026-12-08 at 01:48 UTC, before any run of it: a restart
# threshold relative to the stream's own changes, for the fifth selection's every-layer
# signal, whose absolute threshold (0.14) fired 21 times inside a domain on digits
# class-sorted and 50 times on digits Dirichlet at batch 16. New option restart_relative: a
# restart also needs each layer's change, divided by the median of that layer's last
# restart_window (16) changes, averaged over the layers, to exceed it. Probes of the signal
# alone on development streams (the per-layer test-batch statistics of the source model, a
# script), before this declaration, with the floor 0.14 kept: at 2.5, 50 of the recurring
# twin's 74 domain changes (0.14 alone: 56), no alarm inside a domain on the CIFAR-10-C
# streams measured, digits class-sorted 1 (21), digits Dirichlet batch 16 0 (50); at 3.0,
# 31 of 74 and none inside a domain anywhere.
# * Development streams (they choose): the fourth selection's 17. Candidates: the fourth
#   selection's choice (its figures), the fifth's every-layer 0.14 (its figures, infeasible)
#   and restart_signal=all_layers, restart_shift 0.14 with restart_relative 2.5 and 3.0
#   (restart_window 16, recentre_agreement 0.5).
# * Criterion: the fourth selection's.
# * Evaluation streams (they only score): the fourth selection's (section eval6), only if a
#   new candidate is chosen. Acceptance: as before.
# RESULT, 02:25 UTC, from the development streams alone: restart_relative 2.5 (CHOSEN6). Every
#   candidate but the fifth's is within 0.5 points of source everywhere (digits class-sorted
#   20.72 %, the fourth's figure; the fifth's 21.72); recurring twin, last visit minus first:
#   0.00 at 2.5, -0.30 at 3.0. Largest regret (full-length one-class stream, behind lame):
#   5.13 for both (the fifth's figure; the fourth 5.59, within 0.5 of it); mean regret 0.804
#   at 2.5, 0.806 at 3.0, 0.823 the fourth. On class-sorted streams whose batches hold one to
#   three classes the relative threshold keeps restarts the absolute one made (class-sorted
#   300 22.98 % against 21.62, batch 16 19.78 against 18.53, 2,000 at batch 200 9.46 against
#   8.60), where follow is already the best method (no regret). docs/RESULTS.md, "Sixth
#   selection".
#
# SEVENTH SELECTION, DECLARED on 2026-12-08 at 02:36 UTC, before any run of it. The sixth
# selection's choice, scored on its first evaluation stream to finish (the README demo:
# digits, each corruption its own short stream, reset between them), erred 46.2 % on the
# class-sorted order against 34.4 % for the fourth's: inside a single domain the relative
# threshold fired at class switches between one-class batches (batches 9 and 11 of 23, with a
# median of 8 to 10 past changes, half of them class switches), and every development stream
# of the sixth selection was continual, so none had that kind. Seen on an evaluation stream,
# so the demo stays an evaluation stream and is not used to choose; the development set
# gains streams of that kind, on other corruptions and another seed.
# * Development streams (they choose): the sixth selection's 17, plus digits with a reset at
#   every domain (digits_quick's five corruptions, each its own stream; the split presented
#   twice; batch 64; seed 0; i.i.d. and class-sorted), on which the BN pool runs.
# * Candidates: the fourth selection's choice and the sixth's (restart_min_history 4), their
#   figures, and the sixth's with restart_min_history 16 (a full window before the relative
#   threshold acts).
# * Criterion: the fourth selection's, over the 19 development streams.
# * Evaluation streams (they only score): the fourth selection's (section eval7), only if
#   the new candidate is chosen. Acceptance: as before.
# RESULT, 03:15 UTC, from the development streams alone: the sixth's choice stays (eval7 was
#   not run). No candidate is feasible: all three err 2.5 points above source on digits
#   reset class-sorted (23.67-23.70 %, source 21.15; the detector's alarm on a fresh contrast
#   stream, common to all), a case the criterion did not foresee; set aside as common to
#   all, the largest regrets are equal (7.68, digits reset i.i.d., the same cause) and the
#   mean regret is 1.414 (history 4) against 1.415 (history 16) and 1.432 (the fourth). The
#   new streams did not reproduce the demo's failure (the three within 0.03 points there).
#   docs/RESULTS.md, "Seventh selection".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/stream_selection}
export TTA_JOBS=${TTA_JOBS:-1}
export OMP_NUM_THREADS=1

BN_POOL=source,norm,tent,eta,roid,lame,alpha_bn,rbn,balanced_bn,unmix_tns,gated_bn,rotta,tribe,cmf,follow
LONG_POOL=source,norm,tent,lame,rbn,balanced_bn,rotta,follow
GN_POOL=source,tent,sar,eta,roid,lame,deyo,cmf,follow
VIT_POOL=source,sar,lame,follow
BATCH16_POOL=source,norm,tent,eta,roid,lame,alpha_bn,rbn,balanced_bn,unmix_tns,gated_bn,follow
LONG_EVAL_POOL=source,norm,balanced_bn,follow
EVAL_POOL=source,norm,tent,eta,roid,lame,rbn,balanced_bn,rotta,follow
EVAL_2000_POOL=source,norm,lame,balanced_bn,follow
GN_EVAL_POOL=source,sar,eta,roid,lame,follow
FULL_SORTED_POOL=source,norm,lame,balanced_bn,follow

sweep() {  # sweep <split/name> <overrides...>: one multirun into $OUT/<split>/<name>
  local name=$1; shift
  "$PY" -m benchmarks.run -m name="$name" paths.output_root="$OUT" launcher=joblib runtime.num_threads=1 "$@"
}
bn() { local name=$1; shift; sweep "$name" model=cifar10_resnet26 method="${POOL:-$BN_POOL}" "$@"; }
gn() { local name=$1; shift; sweep "$name" model=cifar10_resnet26_gn method="${POOL:-$GN_POOL}" "$@"; }
vit() { local name=$1; shift; sweep "$name" model=cifar10_vit_small method="${POOL:-$VIT_POOL}" "$@"; }
C=(experiment=cifar10c_continual stream.batch_size=64 stream.n_examples=300)

# -- development streams: seed 1 (CIFAR-10-C) / seed 0 (digits) -----------------------------
dev_bn() {
  bn dev/bn_iid_300 "${C[@]}" seed=1
  bn dev/bn_sorted_300 "${C[@]}" seed=1 stream.label_order=sorted
  bn dev/bn_dirichlet0.1_300 "${C[@]}" seed=1 stream.label_order=dirichlet stream.delta=0.1
  bn dev/bn_class_temporal_300 "${C[@]}" seed=1 stream.label_order=class_temporal stream.delta=0.1
  POOL=$BATCH16_POOL bn dev/bn_sorted_batch16_300 "${C[@]}" seed=1 stream.label_order=sorted stream.batch_size=16
  POOL=$BATCH16_POOL bn dev/bn_iid_batch16_300 "${C[@]}" seed=1 stream.batch_size=16
  POOL=$LONG_POOL bn dev/bn_sorted_2000 "${C[@]}" seed=1 stream.label_order=sorted stream.n_examples=2000
  POOL=$LONG_POOL bn dev/bn_sorted_2000_batch200 "${C[@]}" seed=1 stream.label_order=sorted stream.n_examples=2000 stream.batch_size=200
}
dev_digits() {
  sweep dev/digits experiment=digits_quick seed=0 stream.batch_size=64 method="$BN_POOL" stream.label_order=iid,sorted
}
dev_gn() {
  gn dev/gn_iid_300 "${C[@]}" seed=1
  gn dev/gn_sorted_300 "${C[@]}" seed=1 stream.label_order=sorted
}
dev_vit() {
  vit dev/vit_iid_300 "${C[@]}" seed=1
  vit dev/vit_sorted_300 "${C[@]}" seed=1 stream.label_order=sorted
}

# -- evaluation streams: seed 2 (CIFAR-10-C) / seed 1 (digits); never used to choose --------
eval_bn() {
  POOL=$EVAL_POOL bn eval/bn_iid_300 "${C[@]}" seed=2
  POOL=$EVAL_POOL bn eval/bn_sorted_300 "${C[@]}" seed=2 stream.label_order=sorted
  POOL=$EVAL_POOL bn eval/bn_dirichlet0.01_300 "${C[@]}" seed=2 stream.label_order=dirichlet stream.delta=0.01
  POOL=$EVAL_POOL bn eval/bn_mixed_300 experiment=cifar10c_mixed stream.batch_size=64 stream.n_examples=300 seed=2
  POOL=$EVAL_POOL bn eval/bn_severity3_300 "${C[@]}" seed=2 'stream.severities=[3]'
  POOL=$EVAL_POOL bn eval/bn_iid_batch16_300 "${C[@]}" seed=2 stream.batch_size=16
}
eval_bn_2000() {
  POOL=$EVAL_2000_POOL bn eval/bn_iid_2000 "${C[@]}" seed=2 stream.n_examples=2000
  POOL=$EVAL_2000_POOL bn eval/bn_sorted_2000 "${C[@]}" seed=2 stream.n_examples=2000 stream.label_order=sorted
  POOL=$EVAL_2000_POOL bn eval/bn_imbalanced_2000 "${C[@]}" stream=imbalanced seed=2 stream.n_examples=2000
}
eval_bn_long() {
  POOL=$LONG_EVAL_POOL bn eval/bn_recurring_100k experiment=cifar10c_continual stream=recurring stream.batch_size=64 seed=2 stream.n_examples=334
  POOL=$LONG_EVAL_POOL bn eval/bn_ccc_25k experiment=cifar10c_continual stream=ccc stream.batch_size=64 stream.walk_steps=25 stream.walk_target=0.6 seed=2
}
eval_digits() {
  sweep eval/digits experiment=digits_quick seed=1 stream.batch_size=16 method="$BN_POOL" \
    stream.label_order=iid,dirichlet stream.delta=0.1
}
# -- second selection: new development and evaluation streams ---------------------------------
dev2() {
  POOL=follow bn dev/bn_sorted_full_batch200 experiment=cifar10c_continual seed=1 stream.label_order=sorted
  sweep dev/digits_batch16 experiment=digits_quick seed=0 stream.batch_size=16 method="$BATCH16_POOL" \
    stream.label_order=iid,dirichlet stream.delta=0.1
  sweep dev/digits_batch16_seeds experiment=digits_quick seed=2,3 stream.batch_size=16 method="$BATCH16_POOL"
}
eval2() {
  POOL=$FULL_SORTED_POOL bn eval/bn_sorted_full_batch200 experiment=cifar10c_continual seed=2 stream.corruption_seed=2 stream.label_order=sorted
  POOL=$FULL_SORTED_POOL bn eval/bn_sorted_full_batch100 experiment=cifar10c_continual seed=2 stream.corruption_seed=2 stream.label_order=sorted stream.batch_size=100
}
# -- third and fourth selections: follow's restarts -------------------------------------------
REC5=(model=cifar10_resnet26 experiment=cifar10c_continual stream=recurring stream.batch_size=64 seed=1
  stream.corruption_seed=1 stream.n_examples=334 stream.recurrences=5)
ONE4=(model=cifar10_resnet26 experiment=cifar10c_continual seed=1 stream.label_order=sorted
  'stream.domains=[defocus_blur,gaussian_noise,shot_noise,contrast]')
follow_dev() {  # follow_dev <split> <follow overrides...>: follow on the 17 development streams
  local split=$1; shift
  sweep "$split/bn_recurring_5" "${REC5[@]}" method=follow "$@"
  sweep "$split/bn_one_class_4" "${ONE4[@]}" method=follow "$@"
  POOL=follow bn "$split/bn_iid_300" "${C[@]}" seed=1 "$@"
  POOL=follow bn "$split/bn_sorted_300" "${C[@]}" seed=1 stream.label_order=sorted "$@"
  POOL=follow bn "$split/bn_dirichlet0.1_300" "${C[@]}" seed=1 stream.label_order=dirichlet stream.delta=0.1 "$@"
  POOL=follow bn "$split/bn_class_temporal_300" "${C[@]}" seed=1 stream.label_order=class_temporal stream.delta=0.1 "$@"
  POOL=follow bn "$split/bn_sorted_batch16_300" "${C[@]}" seed=1 stream.label_order=sorted stream.batch_size=16 "$@"
  POOL=follow bn "$split/bn_iid_batch16_300" "${C[@]}" seed=1 stream.batch_size=16 "$@"
  POOL=follow bn "$split/bn_sorted_2000" "${C[@]}" seed=1 stream.label_order=sorted stream.n_examples=2000 "$@"
  POOL=follow bn "$split/bn_sorted_2000_batch200" "${C[@]}" seed=1 stream.label_order=sorted stream.n_examples=2000 stream.batch_size=200 "$@"
  POOL=follow bn "$split/bn_sorted_full_batch200" experiment=cifar10c_continual seed=1 stream.label_order=sorted "$@"
  sweep "$split/digits" experiment=digits_quick method=follow seed=0 stream.batch_size=64 stream.label_order=iid,sorted "$@"
  sweep "$split/digits_batch16" experiment=digits_quick method=follow seed=0 stream.batch_size=16 stream.label_order=iid,dirichlet \
    stream.delta=0.1 "$@"
  sweep "$split/digits_batch16_seeds" experiment=digits_quick method=follow seed=2,3 stream.batch_size=16 "$@"
}
# follow's defaults have changed with the selections (now the sixth's restart); the sections
# name the restart they measured, so that they rerun as they ran. FIRST_LAYER: the third and
# fourth selections' signal (the first layer's input, an absolute threshold alone)
FIRST_LAYER="+method.hparams.restart_signal=first_layer +method.hparams.restart_relative=null"
RESTART_GRID=${RESTART_GRID:-0.3,0.4,0.5,0.6}
dev3() {  # third: restarts from the source statistics. Its baselines ran follow before the
  # fourth selection's defaults; since then restart_shift=null is that follow (no restarts)
  sweep dev3/bn_recurring_5 "${REC5[@]}" method=source,norm,balanced_bn,follow
  sweep dev3/bn_one_class_4 "${ONE4[@]}" method=source,lame,balanced_bn,follow
  follow_dev dev3 $FIRST_LAYER "+method.hparams.restart_shift=$RESTART_GRID" "+method.hparams.recentre_agreement=null"
}
RECENTRE_GRID=${RECENTRE_GRID:-0.4,0.5}
dev4() {  # fourth: restarts that recentre where the agreement is at most 0.5
  follow_dev dev4 $FIRST_LAYER "+method.hparams.restart_shift=$RECENTRE_GRID" "+method.hparams.recentre_agreement=0.5"
}
# the chosen follow on the evaluation streams (CHOSEN: its hydra overrides)
CHOSEN=${CHOSEN:-$FIRST_LAYER +method.hparams.restart_shift=0.4 +method.hparams.recentre_agreement=0.5}
ALL_LAYERS="+method.hparams.restart_signal=all_layers +method.hparams.restart_shift=0.14 +method.hparams.recentre_agreement=0.5"
CHOSEN5=${CHOSEN5:-$ALL_LAYERS +method.hparams.restart_relative=null}
eval4() { eval_follow eval4 "$CHOSEN"; }
eval5() { eval_follow eval5 "$CHOSEN5"; }
dev5() {  # fifth: the restart signal over every layer's test-batch input
  follow_dev dev5 $CHOSEN5
}
RELATIVE_GRID=${RELATIVE_GRID:-2.5,3.0}
dev6() {  # sixth: that signal with a threshold relative to the stream's own changes
  follow_dev dev6 $ALL_LAYERS "+method.hparams.restart_relative=$RELATIVE_GRID"
}
CHOSEN6=${CHOSEN6:-$ALL_LAYERS +method.hparams.restart_relative=2.5}
eval6() { eval_follow eval6 "$CHOSEN6"; }
DIGITS_RESET=(experiment=digits_quick stream=reset_each_shift stream.replays=2 stream.batch_size=64 seed=0 stream.label_order=iid,sorted)
dev7() {  # seventh: a full window before the relative threshold acts; digits reset at every domain
  sweep dev7/digits_reset "${DIGITS_RESET[@]}" method="$BN_POOL"
  sweep dev7/digits_reset "${DIGITS_RESET[@]}" method=follow $CHOSEN
  follow_dev dev7 $CHOSEN6 +method.hparams.restart_min_history=16
  sweep dev7/digits_reset "${DIGITS_RESET[@]}" method=follow $CHOSEN6 +method.hparams.restart_min_history=16
}

eval_follow() {  # eval_follow <split> <follow overrides>: the chosen follow on the evaluation streams
  local E=$1 hp=($2)
  POOL=follow bn $E/bn_iid_300 "${C[@]}" seed=2 "${hp[@]}"
  POOL=follow bn $E/bn_sorted_300 "${C[@]}" seed=2 stream.label_order=sorted "${hp[@]}"
  POOL=follow bn $E/bn_dirichlet0.01_300 "${C[@]}" seed=2 stream.label_order=dirichlet stream.delta=0.01 "${hp[@]}"
  POOL=follow bn $E/bn_mixed_300 experiment=cifar10c_mixed stream.batch_size=64 stream.n_examples=300 seed=2 "${hp[@]}"
  POOL=follow bn $E/bn_severity3_300 "${C[@]}" seed=2 'stream.severities=[3]' "${hp[@]}"
  POOL=follow bn $E/bn_iid_batch16_300 "${C[@]}" seed=2 stream.batch_size=16 "${hp[@]}"
  POOL=follow bn $E/bn_iid_2000 "${C[@]}" seed=2 stream.n_examples=2000 "${hp[@]}"
  POOL=follow bn $E/bn_sorted_2000 "${C[@]}" seed=2 stream.n_examples=2000 stream.label_order=sorted "${hp[@]}"
  POOL=follow bn $E/bn_imbalanced_2000 "${C[@]}" stream=imbalanced seed=2 stream.n_examples=2000 "${hp[@]}"
  POOL=follow bn $E/bn_recurring_100k experiment=cifar10c_continual stream=recurring stream.batch_size=64 seed=2 stream.n_examples=334 "${hp[@]}"
  POOL=follow bn $E/bn_ccc_25k experiment=cifar10c_continual stream=ccc stream.batch_size=64 stream.walk_steps=25 stream.walk_target=0.6 seed=2 "${hp[@]}"
  sweep $E/digits experiment=digits_quick seed=1 stream.batch_size=16 method=follow stream.label_order=iid,dirichlet stream.delta=0.1 "${hp[@]}"
  POOL=follow bn $E/bn_sorted_full_batch200 experiment=cifar10c_continual seed=2 stream.corruption_seed=2 stream.label_order=sorted "${hp[@]}"
  POOL=follow bn $E/bn_sorted_full_batch100 experiment=cifar10c_continual seed=2 stream.corruption_seed=2 stream.label_order=sorted stream.batch_size=100 "${hp[@]}"
}
eval_demo() {
  "$PY" -m benchmarks.demo --methods source norm rbn balanced_bn lame tent follow auto > "$OUT/eval/demo.txt"
}
eval_gn() {
  POOL=$GN_EVAL_POOL gn eval/gn_iid_300 "${C[@]}" seed=2
  POOL=$GN_EVAL_POOL gn eval/gn_sorted_300 "${C[@]}" seed=2 stream.label_order=sorted
}
eval_vit() {
  vit eval/vit_iid_300 "${C[@]}" seed=2
  vit eval/vit_sorted_300 "${C[@]}" seed=2 stream.label_order=sorted
}

select_one() {  # select_one <name> <methods> <dev folders> <eval folders>
  "$PY" -m benchmarks.select "methods=[$2]" "dev=$3" "eval=$4" out="$OUT/selected_$1" quiet=true \
    "swept=[software.git_commit,software.git_dirty,metric.window]" "ignore=[software.git_commit,software.git_dirty]"
}
BN_DEV="[$OUT/dev/bn_iid_300,$OUT/dev/bn_sorted_300,$OUT/dev/bn_dirichlet0.1_300,$OUT/dev/bn_class_temporal_300,$OUT/dev/bn_sorted_batch16_300,$OUT/dev/bn_iid_batch16_300,$OUT/dev/bn_sorted_2000,$OUT/dev/bn_sorted_2000_batch200,$OUT/dev/digits]"
BN_EVAL_SHORT="$OUT/eval/bn_iid_300,$OUT/eval/bn_sorted_300,$OUT/eval/bn_dirichlet0.01_300,$OUT/eval/bn_mixed_300,$OUT/eval/bn_severity3_300,$OUT/eval/bn_iid_batch16_300,$OUT/eval/bn_iid_2000,$OUT/eval/bn_sorted_2000,$OUT/eval/bn_imbalanced_2000,$OUT/eval/digits"
select_bn() {  # the pool every BN stream ran, on every evaluation stream; then a wider pool without the 100,000-image streams
  select_one bn source,norm,balanced_bn,follow "$BN_DEV" "[$BN_EVAL_SHORT,$OUT/eval/bn_recurring_100k,$OUT/eval/bn_ccc_25k]"
  select_one bn_wide source,norm,lame,balanced_bn,follow "$BN_DEV" "[$BN_EVAL_SHORT]"
}
select_gn() {  # GroupNorm and LayerNorm (ViT) models
  select_one gn source,sar,lame,follow "[$OUT/dev/gn_iid_300,$OUT/dev/gn_sorted_300,$OUT/dev/vit_iid_300,$OUT/dev/vit_sorted_300]" \
    "[$OUT/eval/gn_iid_300,$OUT/eval/gn_sorted_300,$OUT/eval/vit_iid_300,$OUT/eval/vit_sorted_300]"
}

SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(dev_bn dev_digits dev_gn dev_vit eval_bn eval_bn_2000 eval_bn_long eval_digits eval_demo eval_gn eval_vit select_bn select_gn dev2 eval2 dev3 dev4 eval4 dev5 eval5 dev6 eval6 dev7)
mkdir -p "$OUT/eval"
for section in "${SECTIONS[@]}"; do "$section"; done
