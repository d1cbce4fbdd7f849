#!/bin/bash
# the same short pipeline on two commits, fs storage, in-process Ray: are the numbers bit-identical?
for X in ${WHICH:-old new}; do
  cd /tmp/wt_$X
  env -u RAY_ADDRESS -u AWS_ENDPOINT_URL -u MLFLOW_TRACKING_URI PYTHONPATH=/tmp/wt_$X HKD_STACK_DIR=/tmp/eq/nostack HKD_DATA_DIR=/work/shared/data \
    /work/main/.venv/bin/python -m orchestrator pipeline storage=fs tracking=file storage.root=/tmp/eq/$X/store \
    tracking.root=/tmp/eq/$X/mlflow trajectories.num=128 trajectories.holdout=16 trajectories.shard_size=32 \
    trajectories.steps=6 train.total_kimg=0.512 train.checkpoint_every_kimg=0.256 eval.n=100 "eval.teacher_nfe=[]" \
    --no-progress --json /tmp/eq/$X.json > /tmp/eq/$X.log 2>&1
  echo "$X rc=$?" >> /tmp/eq/done
done
