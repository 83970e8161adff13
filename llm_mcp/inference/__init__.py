"""The inference layer: what to sample from (targets), the samplers, export and vLLM serving.

Imports the core and, lazily inside samplers and merges, torch and the trainer's model helpers.
Never imports the job executors, the tools or the MCP SDK.
"""
