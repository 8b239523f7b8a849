#!/bin/bash
# A short run of every method (the flags of the end-to-end tests), for checking that a refactor
# changes no number: run it from two checkouts and diff. Not collected by pytest.
#   bash tests/small_runs.sh out/before          (in the old checkout: bash ../new/tests/...)
#   bash tests/small_runs.sh out/after && for m in star sft vstar search quiet_star sos; do
#       diff out/before/$m/metrics.notime out/after/$m/metrics.notime && echo "$m same"; done
# metrics.notime: each metrics.jsonl row with its keys sorted and its wall times dropped.
D=$1; mkdir -p $D
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
run() { m=$1; shift; rm -rf $D/$m
    python train.py --method $m --out $D/$m "$@" > $D/$m.log 2>&1 || echo "FAIL $m"; }
run star --task addition --n-train 16 --n-unlabeled 12 --n-test 12 --steps 30 \
    --star-steps 8 --iterations 2 --batch-size 8 --train-difficulty 1-2 --test-difficulty \
    1-2 --sample-batch-size 64
run sft --task addition --n-train 16 --n-test 12 --steps 30 --batch-size 8 \
    --train-difficulty 1-2 --test-difficulty 1-2
run vstar --n-train 16 --n-unlabeled 8 --n-test 6 --steps 20 --batch-size 8 --samples 4 \
    --eval-samples 4 --verifier-steps 3 --iterations 1 --train-difficulty 2-3 \
    --test-difficulty 2-3 --temperature 1.5
run search --n-train 6 --n-unlabeled 2 --n-test 3 --steps 2 --verifier-steps 2 \
    --eval-samples 2 --budgets 1,2 --samples 2 --rollouts 2 --batch-size 4 \
    --train-difficulty 2 --test-difficulty 2
run quiet_star --base-steps 3 --think-steps 4 --eval-every 2 --n-test 6 --seq-len 24 \
    --thought-len 2 --batch-size 2 --train-difficulty 1 --test-difficulty 1
run sos --n-train 12 --n-unlabeled 6 --n-test 6 --steps 6 --star-steps 3 --iterations 1 \
    --eval-samples 2 --train-difficulty 2 --test-difficulty 2 --batch-size 4
for f in $D/*/metrics.jsonl; do python -c "
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(json.dumps({k: v for k, v in row.items() if 'wall' not in k}, sort_keys=True))
" $f > ${f%.jsonl}.notime; done
