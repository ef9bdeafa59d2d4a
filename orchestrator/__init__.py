"""orchestrator: sweeps of grnn_engine trials on Ray Tune, their results ledger, status and reports."""
