#!/usr/bin/env bash
# Seven PRDP + world-judge runs side by side, 2 CPU threads each (like the 2-core development machine), for a
# machine with >= 14 free cores; each is stopped after RUN_TIMEOUT_S and evaluated on the held-out captions along
# the way. The table "Sweep" in docs/world.md came from `bash experiments/world_prdp_sweep.sh OUTDIR 465`.
# usage: bash experiments/world_prdp_sweep.sh OUTDIR [RUN_TIMEOUT_S=480] [EPOCH_SCALE=1]   (ONLY=regex picks runs; THREADS=n)
# Prints, per run: epochs done, seconds per epoch, and (verifier pass, judge) at every held-out evaluation.
OUTDIR=${1:-/tmp/sweep}; TMO=${2:-480}; SCALE=${3:-1}
mkdir -p "$OUTDIR" /tmp/runs
ep() { python3 -c "import math;print(max(2,int(round($1*$SCALE))))"; }
run() {  # name epochs eval_every overrides...
  local name=$1 e=$(ep $2) ev=$(ep $3); shift 3
  [[ -n "$ONLY" && ! "$name" =~ $ONLY ]] && return
  ( CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2} timeout $TMO python3 -m genreward train configs/prdp_world_judge.yaml \
      output_dir=/tmp/runs/$name model.device=cpu prdp.epochs=$e eval.every_epochs=$ev checkpoint.every_epochs=0 \
      "$@" > /tmp/runs/$name.log 2>&1; echo "$name rc=$?" >> /tmp/runs/rc.txt ) &
}
COMMON="prdp.updates_per_epoch=1 prdp.images_per_prompt=8"
run R1_n2_lr1e-3   230 46 $COMMON prdp.prompts_per_epoch=2 train.optim.lr=1e-3
run R2_n2_lr3e-3   230 46 $COMMON prdp.prompts_per_epoch=2 train.optim.lr=3e-3
run R3_n4_lr2e-3   120 24 $COMMON prdp.prompts_per_epoch=4 train.optim.lr=2e-3
run R4_n2_conv     200 40 $COMMON prdp.prompts_per_epoch=2 train.optim.lr=1e-3 'train.lora.targets=[to_q,to_k,to_v,to_out.0,conv1,conv2]'
run R5_n2_full     200 40 $COMMON prdp.prompts_per_epoch=2 train.optim.lr=3e-5 train.trainable=full
run R6_n8_lr3e-3    62 16 $COMMON prdp.prompts_per_epoch=8 train.optim.lr=3e-3
run R7_n2b16       115 23 prdp.updates_per_epoch=1 prdp.images_per_prompt=16 prdp.prompts_per_epoch=2 train.optim.lr=1e-3
wait
cd /tmp/runs && tar czf "$OUTDIR/sweep.tgz" rc.txt *.log */metrics.jsonl */eval/*/summary.json */config.yaml 2>/dev/null
python3 - "$OUTDIR" <<'PY'
import json, glob, os, sys
for run in sorted(glob.glob("/tmp/runs/R*/")):
    rows = [json.loads(l) for l in open(run + "metrics.jsonl")] if os.path.exists(run + "metrics.jsonl") else []
    ep = [r for r in rows if "time_sampling" in r]
    evs = []
    for d in sorted(glob.glob(run + "eval/*/summary.json"), key=os.path.getmtime):
        s = json.load(open(d)); evs.append((os.path.basename(os.path.dirname(d)), s))
    def vp(s):
        try: return round(s["verifier"], 4), round(s["vlm_judge"], 3)
        except Exception: return s
    print(os.path.basename(run[:-1]), "epochs", len(ep), "s/epoch %.2f" % (sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in ep) / max(1, len(ep))),
          [(n, vp(s)) for n, s in evs])
PY
