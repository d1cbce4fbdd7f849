"""What the stages stand on: S3/filesystem storage (``storage``), MLflow tracking (``tracking``) and its model
registry (``registry``), data sets and Inception weights found locally or in the bucket (``datasets``), the
Ray cluster this driver joins (``raycluster``), the checks before any work (``preflight``) and a Ray job
driver's working directory (``jobdir``). Nothing here knows the stages, the sweep or the analyses."""
