#!/bin/bash
# Seed 1's 2x baseline as soon as seed 0's 2x frees its slot: config identical to the pipeline's own
cd /work/bench
R=runs/bench_retinanet
until [ -f $R/seed0/baseline_2x/run_summary.json ]; do sleep 20; done
OMP_NUM_THREADS=1 exec .venv/bin/labelenc train configs/bench_retinanet_synth.yaml train.seed=1 train.schedule=2x output_dir=$R/seed1/baseline_2x > /work/seed1_2x.log 2>&1
