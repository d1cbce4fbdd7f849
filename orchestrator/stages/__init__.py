"""The pipeline: the driver that plans and runs the stages with their caching and MLflow runs (``driver``), the
stages themselves (``steps``: teacher, trajectories, distill, evaluate), the code that runs in Ray workers
(``workers``, ``trainer``, ``reporting``), evaluation on Ray (``evaluation``), the headline (``headline``) and the
shipped teacher's record (``ship``). Builds on ``orchestrator.services``."""
