"""The MCP tools, one module per concern; each module's `register(mcp)` adds its tools.

    models        list_models
    datasets      datasets (list / inspect)
    save_dataset  save_dataset
    finetune      start_finetune
    jobs          job_status, cancel_job (+ the jobs://{id}/log and /metrics resources)
    sampling      sample
    serving       export_adapter, serve_adapter
    evaluate      evaluate (base vs adapters vs checkpoints on held-out rows)

A tool is a handler `fn(ctx, request)` over a typed request model (llm_mcp.core.request.Request) plus the
text summary of its result; it reads the shared services (`services.AppState`) from the server's lifespan
context. `common` registers a handler from its request and holds the error boundary.
"""

from llm_mcp.tools import datasets, evaluate, finetune, jobs, models, sampling, save_dataset, serving

MODULES = (models, datasets, save_dataset, finetune, jobs, sampling, serving, evaluate)
