#!/bin/bash
# Seed 2's baselines in the slot that seed 1's pipeline frees after its baseline 1x: configs identical to the pipeline's own
cd /work/bench
R=runs/bench_retinanet
until [ -f $R/seed1/baseline_1x/run_summary.json ]; do sleep 30; done
OMP_NUM_THREADS=1 .venv/bin/labelenc train configs/bench_retinanet_synth.yaml train.seed=2 train.schedule=2x output_dir=$R/seed2/baseline_2x > /work/seed2_2x.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/labelenc train configs/bench_retinanet_synth.yaml train.seed=2 train.schedule=1x output_dir=$R/seed2/baseline_1x > /work/seed2_1x.log 2>&1
