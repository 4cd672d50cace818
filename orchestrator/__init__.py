"""ditsweep orchestration: spec, Ray Tune sweep, MLflow tracking, reports, clusters."""
