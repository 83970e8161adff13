"""Fine-tuning jobs: a durable SQLite store, a supervisor per job, and the scheduler between them."""
