"""Benchmarks: our path and its baseline side by side, alternating, medians and ratios.

    llm-mcp bench train    our LoRA job vs a plain HF Trainer + PEFT script (tokens/s, memory, loss)
    llm-mcp bench methods  lora / qlora / dora / sparse on the same model and data, ratios to lora
    llm-mcp bench server   cold start; p50/p95 of list_models and job_status (stdio, HTTP) with a job running
    llm-mcp bench sample   tokens/s for 32 prompts; adapter hot-swap time

Each writes results.json, results.md and chart.png to --out.
"""
