"""The states a trial and its run go through, as MLflow names a run's status (RunStatus): plain strings
in a module that imports nothing, so the state machine (orchestrator.trial_state), the console and
the report read them without loading the tracking package (which sets MLflow's environment)."""

PENDING = "PENDING"  # a trial not started yet: no run (ditsweep's own; MLflow's runs start RUNNING)
RUNNING = "RUNNING"
FINISHED = "FINISHED"
FAILED = "FAILED"
KILLED = "KILLED"
ENDED = (FINISHED, FAILED, KILLED)
