"""The MCP tools, one module per concern; each module's `register(mcp)` adds its tools.

    models     list_models
    datasets   datasets (list / inspect), save_dataset
    finetune   start_finetune
    jobs       job_status, cancel_job (+ the jobs://{id}/log and /metrics resources)
    sampling   sample
    serving    export_adapter, serve_adapter
    evaluate   evaluate (base vs adapters vs checkpoints on held-out rows)

Tools are plain functions that take the request `Context` and read the shared services
(`services.AppState`) from the server's lifespan context; `common` holds the error boundary,
result helpers and text summaries they share.
"""

from llm_mcp.tools import datasets, evaluate, finetune, jobs, models, sampling, serving

MODULES = (models, datasets, finetune, jobs, sampling, serving, evaluate)
