"""The training process: what `accelerate launch -m llm_mcp.train.run JOB_DIR` runs.

Imports torch; never imported by the server process.
"""
