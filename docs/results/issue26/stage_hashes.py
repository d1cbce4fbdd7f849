"""The stage hashes of a dozen configs (the default, every packaged preset, some single overrides), as JSON: run
it on two commits and compare (docs/results/issue26/stage_hashes.json: before and after the refactor, identical)."""

import json

from orchestrator.config import compose, from_composed

sets = [
    [],
    ["experiment=smoke"],
    ["experiment=fmnist_small"],
    ["experiment=study_fmnist"],
    ["experiment=cifar_gpu"],
    ["teacher=empirical", "model.init=none"],
    ["train.states_per_traj=4"],
    ["data=mnist"],
    ["model.variant=kd"],
    ["train.adversarial_weight=0.01"],
    ["model.observables=state"],
    ["storage=fs", "tracking=file"],
]
out = {}
for s in sets:
    try:
        out[" ".join(s)] = from_composed(compose(s)).stages()
    except Exception as e:
        out[" ".join(s)] = str(e)[:80]
print(json.dumps(out, sort_keys=True))
