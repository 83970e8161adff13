"""Validation: a tool's typed request (llm_mcp.core.*_request) checked against the matrix, the data, the
hardware and the job store, resolved into the config a job runs with, every problem reported at once.

Above llm_mcp.modeling (token counts need the tokenizer, imported on first use), below the tools.
"""
