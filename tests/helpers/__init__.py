"""Shared test machinery: the process-group runner, the Metric tester, one fit of a real
Trainer with the monitor, and readers of what real loggers wrote."""
