"""llm_mcp: an MCP server that lets LLM agents fine-tune language models.

Importing this package is cheap on purpose: nothing here imports torch. Heavy work
(training, sampling, building models) imports it inside job processes or on first use.
"""

__version__ = "0.1.0"
