# Our packages' loggers: attached to Prefect's API handler (PREFECT_LOGGING_EXTRA_LOGGERS),
# so their records appear in the Prefect UI with the flow run's own.
LIBRARY_LOGGERS = ("deit_model", "tasks", "flows")
