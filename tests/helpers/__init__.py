"""Shared test machinery: the process-group runner and the Metric tester."""
