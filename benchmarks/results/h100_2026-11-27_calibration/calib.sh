#!/bin/bash
# Schedule-length calibration, 2 seeds: Faster R-CNN as configured (is 2400 within 1.5 AP of 4800?) and
# RetinaNet with train.grad_clip=2.0 (BENCHMARKS 10c) at 3200, 4800 and 6400 (6400 may need a second call: RESUME=1).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/machine.txt
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> $OUT/machine.txt
nproc >> $OUT/machine.txt
nvidia-cuda-mps-control -d 2>/dev/null && echo mps >> $OUT/machine.txt
[ -f data/synth/annotations/instances_val.json ] || python3 -m labelenc.cli data synth --out data/synth --seed 0 --num-train 1024 --num-val 500 --min-object-size 32 > /dev/null || exit 1
start=$(date +%s)
mkdir -p runs
launch() { name=$1; cfg=$2; seed=$3; iters=$4; shift 4
  python3 -m labelenc.cli train $cfg train.device=cuda train.seed=$seed train.schedule=1x train.base_iters=$iters \
    train.checkpoint_period=1600 output_dir=runs/cal/$name "$@" >> runs/log_$name.txt 2>&1 &
}
R=configs/bench_retinanet_synth.yaml; F=configs/bench_faster_rcnn_synth.yaml
if [ -z "$RESUME" ]; then
  for s in 0 1; do
    launch frc2400_s$s $F $s 2400; launch frc4800_s$s $F $s 4800
    for n in 3200 4800 6400; do launch retclip${n}_s$s $R $s $n train.grad_clip=2.0; done
  done
else
  for s in 0 1; do launch retclip6400_s$s $R $s 6400 train.grad_clip=2.0 --resume; done
fi
deadline=$((start + ${LIMIT:-480}))
while [ $(date +%s) -lt $deadline ] && [ -n "$(jobs -r)" ]; do
  sleep 20; t=$(( $(date +%s) - start ))
  echo "t=$t $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader) running=$(jobs -r | wc -l)"
done
# stop what is left only after its next checkpoint could be written (the 6400 runs at 4800)
kill $(jobs -p) 2>/dev/null; sleep 2
python3 - > $OUT/calib.md <<'PY'
import json, math, pathlib, re
print("| run | iterations | AP | AP50 | wall s | last progress | max loss jump (x, at) | max grad_norm window after 1000 |")
print("|---|---|---|---|---|---|---|---|")
for d in sorted(pathlib.Path("runs/cal").iterdir()):
    s = d / "run_summary.json"
    log = pathlib.Path(f"runs/log_{d.name}.txt").read_text(errors="replace")
    prog = re.findall(r"(\d+)/(\d+) \[([0-9:]+)<", log)
    last = "/".join(prog[-1][:2]) + " in " + prog[-1][2] if prog else "-"
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()] if (d / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "loss" in r]
    jump, at = 0.0, "-"
    for a, b in zip(rows, rows[1:]):
        if a["loss"] > 0 and b["loss"] / a["loss"] > jump:
            jump, at = b["loss"] / a["loss"], b["iteration"]
    g = max((r.get("grad_norm", 0) for r in rows if r["iteration"] > 1000), default=float("nan"))
    tail = f"{jump:.2f}, {at} | {g:.2f}"
    if s.is_file():
        j = json.loads(s.read_text()); m = j.get("metrics", {}).get("bbox", {})
        print(f"| {d.name} | {j.get('iterations')} | {100*m.get('AP', math.nan):.1f} | {100*m.get('AP50', math.nan):.1f} | {round(j.get('wall_time', 0))} | {last} | {tail} |")
    else:
        print(f"| {d.name} | unfinished | | | | {last} | {tail} |")
PY
cat $OUT/calib.md
tar czf $OUT/runs.tgz runs/log_*.txt $(ls runs/cal/*/run_summary.json runs/cal/*/metrics.jsonl runs/cal/*/config.yaml 2>/dev/null)
