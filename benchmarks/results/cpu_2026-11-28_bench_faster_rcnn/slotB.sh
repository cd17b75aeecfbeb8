#!/bin/bash
# Slot B: Faster R-CNN seed 0's baseline 1x (resumed from its checkpoint), then seed 1's baselines; configs identical to the pipeline's own
cd /work/bench
R=runs/bench_faster_rcnn
OMP_NUM_THREADS=1 .venv/bin/labelenc train configs/bench_faster_rcnn_synth.yaml train.seed=0 train.schedule=1x output_dir=$R/seed0/baseline_1x --resume > /work/frcnn_s0_1x_resume.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/labelenc train configs/bench_faster_rcnn_synth.yaml train.seed=1 train.schedule=2x output_dir=$R/seed1/baseline_2x > /work/frcnn_s1_2x.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/labelenc train configs/bench_faster_rcnn_synth.yaml train.seed=1 train.schedule=1x output_dir=$R/seed1/baseline_1x > /work/frcnn_s1_1x.log 2>&1
