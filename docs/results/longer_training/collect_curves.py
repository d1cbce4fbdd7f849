"""The figure and table of docs/results/longer_training from the FID curves in MLflow (eval.curve_n), with
`hkd compare`'s own pieces. `hkd compare RUN...` does the same and more for runs that finished (it also needs
each run's model, for the spectra); run A was stopped by hand at 125 kimg, before its model was logged.

    eval "$(python infra/local/stack.py env)"
    python docs/results/longer_training/collect_curves.py OUT_FOLDER "LABEL=RUN_ID" ...
"""

import json
import sys
from pathlib import Path

from orchestrator.analysis.compare import Source, curves_markdown, run_curves
from orchestrator.analysis.study_figures import curves as plot_curves
from orchestrator.config import load
from orchestrator.services import tracking as T

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
client = T._client(load([]).tracking.resolved_uri())
curves = run_curves(client, [Source(a.split("=", 1)[0], "", a.split("=", 1)[1]) for a in sys.argv[2:]])
(out / "curves.json").write_text(json.dumps(curves, indent=1))
(out / "curves.md").write_text(curves_markdown(curves))
plot_curves(
    {
        "variants": curves,
        "teacher": {35: {"fid": 41.50}},
        "curve_n": 1000,
        "study": "the main job's recipe trained longer: FID@1000 (NFE 1) at every checkpoint",
    },
    out / "curves.png",
)
print(curves_markdown(curves))
