"""The core layer: what every other layer builds on, importing neither torch nor the MCP SDK.

errors, settings, the support matrix and method defaults, estimates and hardware, dataset
validation, local checkpoints, the typed job config, the job store and a job directory's files,
and the validation that turns a start_finetune request into a job config.
"""
