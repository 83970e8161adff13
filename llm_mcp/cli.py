"""Command line: `llm-mcp [serve]`, `llm-mcp models`, `llm-mcp make-tiny-model`."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from llm_mcp import __version__
from llm_mcp.core.errors import LlmMcpError
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import FINAL_STATES, Job
from llm_mcp.inference.exports.llama_cpp import setup_command


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    if getattr(args, "home", None):
        settings.home = Path(args.home).expanduser().absolute()
    if getattr(args, "models", None):
        settings.models_path = Path(args.models).expanduser()
    settings.allowed_roots += [Path(p).expanduser() for p in getattr(args, "allow_root", None) or []]
    token_file = getattr(args, "auth_token_file", None)
    if getattr(args, "sampler", None):
        settings.sampler = args.sampler
    if getattr(args, "vllm_url", None):
        settings.vllm_url = args.vllm_url
    if getattr(args, "executor", None):
        settings.executor = args.executor
    if token_file:
        settings.auth_token = Path(token_file).expanduser().read_text(encoding="utf-8").strip() or None
    return settings


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models", metavar="PATH", help="model support matrix (default: LLM_MCP_MODELS or bundled models.yaml)"
    )
    p.add_argument("--home", metavar="DIR", help="state directory (default: LLM_MCP_HOME or ~/.llm_mcp)")
    p.add_argument(
        "--allow-root",
        metavar="DIR",
        action="append",
        help="extra directory datasets / local models / exports may live under (repeatable)",
    )
    p.add_argument(
        "--executor",
        choices=["local", "slurm", "ray"],
        help="where jobs run (default LLM_MCP_EXECUTOR or local; README: 'Running on a cluster')",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from llm_mcp.server import AppState, build_server

    settings = _settings(args)
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit makes writes fail (a clear tool error), not kill the server
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    settings.ensure_home()
    state = AppState.load(settings)
    state.startup()
    server = build_server(state, log_level=args.log_level)
    try:
        if args.transport == "stdio":
            server.run("stdio")
            return 0
        from llm_mcp.http import build_http_app, serve_http

        app = build_http_app(
            server,
            args.transport,
            host=args.host,
            token=settings.auth_token,
            allowed_hosts=args.allowed_host,
            session_idle_s=settings.session_idle_s,
            max_sessions=settings.max_sessions,
        )
        path = "/sse" if args.transport == "sse" else "/mcp"
        print(
            f"llm-mcp {args.transport} on http://{args.host}:{args.port}{path}"
            f"{' (bearer token required)' if settings.auth_token else ''}; sampler {state.backend}",
            file=sys.stderr,
        )
        serve_http(app, args.host, args.port)
        return 0
    finally:
        state.shutdown()


def cmd_models(args: argparse.Namespace) -> int:
    from llm_mcp.core.listing import list_models, summarize
    from llm_mcp.server import AppState

    state = AppState.load(_settings(args))
    if args.check:
        print(
            f"{state.settings.models_path}: {len(state.matrix.models)} models, "
            f"{len(state.matrix.architectures)} local architectures: valid"
        )
        return 0
    result = list_models(state.matrix, state.hardware(), state.defaults, method=args.method, fits=args.fits)
    print(summarize(result, args.method))
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from llm_mcp.tiny import make_tiny_model

    out = make_tiny_model(args.dir, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    print(out)
    return 0


def _bar(step: int, total: int | None, width: int = 30) -> str:
    if not total:
        return "[" + "?" * width + "]"
    done = int(width * min(step, total) / total)
    return "[" + "#" * done + "-" * (width - done) + "]"


def redraw(line: str, width: int) -> str:
    """What to write to a terminal `width` columns wide to replace the current line with `line`.

    Carriage return, the line cut to fit (a line that wraps cannot be redrawn in place), then
    erase-to-end-of-line, so nothing of a longer previous line is left behind.
    """
    return "\r" + line[: max(1, width - 1)] + "\033[K"


def _terminal_width(default: int = 100) -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return default


def _home_source(args: argparse.Namespace) -> str:
    if getattr(args, "home", None):
        return "from --home"
    if os.environ.get("LLM_MCP_HOME"):
        return "from LLM_MCP_HOME"
    return "the default; set LLM_MCP_HOME or pass --home to read another"


def no_jobs_message(home: Path) -> str:
    return (
        f"No jobs in {home}. Jobs live in the state directory of the server that started them (the demo "
        "uses ./.demo unless LLM_MCP_HOME is set): pass --home DIR or set LLM_MCP_HOME to read that one."
    )


def cancel_message(before: Job, after: Job) -> str:
    """One sentence on what `jobs ID --cancel` did, from the job before and after the cancel."""
    if before.state in FINAL_STATES:
        return f"{after.id} already ended {before.state}; nothing to do"
    if before.state == "queued" and after.state == "cancelled":
        return f"{after.id} was queued: removed from the queue (now cancelled)"
    if after.state == "running" and after.cancel_requested:
        again = " (again)" if before.cancel_requested else ""
        return (
            f"cancel requested{again} for {after.id}: it checkpoints at the next step boundary, then ends "
            f"'cancelled' (resume_from='{after.id}' continues it)"
        )
    if after.state in FINAL_STATES:
        return f"{after.id} ended {after.state} meanwhile; nothing to do"
    return f"{after.id} is {after.state} and the cancel did not take; run the command again"


def _progress_line(job: Job, s) -> str:
    return (
        f"{job.id} {job.state:<9} {_bar(s.step, s.total_steps)} {s.step}/{s.total_steps or '?'}"
        + (f" loss {s.loss:.4f}" if s.loss is not None else "")
        + (f" {s.tokens_per_s:,.0f} tok/s" if s.tokens_per_s else "")
        + (f" ETA {s.eta_s:.0f}s" if s.eta_s is not None else "")
    )


def _follow(store, executor, job: Job) -> Job:
    """Show progress on stderr until the job ends: redrawn in place on a terminal, a line per change otherwise."""
    import time

    from llm_mcp.jobs.status import build_status

    tty = sys.stderr.isatty()
    last = None
    while job.state not in FINAL_STATES:
        line = _progress_line(job, build_status(store, job, log_lines=0))
        if tty:
            print(redraw(line, _terminal_width()), end="", file=sys.stderr, flush=True)
        elif line != last:
            print(line, file=sys.stderr, flush=True)
        last = line
        time.sleep(1)
        executor.poll()
        job = store.get(job.id)
    if tty and last is not None:
        print(file=sys.stderr)
    return job


def cmd_jobs(args: argparse.Namespace) -> int:
    from llm_mcp.core.store import JobNotFoundError, JobStore
    from llm_mcp.jobs.executor import make_executor
    from llm_mcp.jobs.status import build_status, summarize_list, summarize_status

    settings = _settings(args)
    home = settings.home
    print(f"jobs in {home} ({_home_source(args)})", file=sys.stderr)
    if not (home / "jobs.db").exists():  # nothing was ever run here: say so, and do not create the directory
        if not args.job_id:
            print(no_jobs_message(home))
            return 0
        raise JobNotFoundError(
            f"no job {args.job_id!r} in {home}: no job was ever started there; "
            "pass --home DIR or set LLM_MCP_HOME to the server's state directory"
        )
    store = JobStore(home)
    executor = make_executor(settings.executor, store, settings)
    executor.poll()
    if not args.job_id:
        jobs = store.list(limit=args.limit)
        print(summarize_list([build_status(store, j, log_lines=0) for j in jobs]) if jobs else no_jobs_message(home))
        return 0
    job = store.get(args.job_id)
    if args.cancel:
        owner = executor if job.engine == executor.name else make_executor(job.engine, store, settings)
        job_after = owner.cancel(args.job_id)
        print(cancel_message(job, job_after))
        job = job_after
    if args.follow:
        job = _follow(store, executor, job)
    print(summarize_status(build_status(store, job)))
    return 0 if job.state != "failed" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import anyio

    from llm_mcp.bench.common import stamp

    out = Path(args.out or f"bench-results/{args.which}-{stamp()}")
    if args.which in ("train", "methods"):
        from llm_mcp.bench import train

        steps = args.steps or (3 if args.tiny else 12)
        if args.which == "methods":
            anyio.run(train.bench_methods, out, args.reps, steps, args.batch_size, args.tiny)
        elif args.device == "cuda" and not shutil.which("nvidia-smi"):
            print(
                "error: --device cuda needs an NVIDIA GPU (nvidia-smi not found); omit --device to bench on CPU",
                file=sys.stderr,
            )
            return 2
        else:
            anyio.run(train.bench_train, out, args.reps, steps, args.batch_size, args.tiny, args.device, args.workload)
    elif args.which == "server":
        from llm_mcp.bench.server import bench_server

        anyio.run(bench_server, out, args.reps, 20 if args.tiny else 100)
    else:
        from llm_mcp.bench.sample import bench_sample

        anyio.run(bench_sample, out, 4 if args.tiny else 32, 8 if args.tiny else 32, args.tiny, not args.no_vllm)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llm_mcp.demo import main as demo_main

    return demo_main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-mcp", description="MCP server for fine-tuning language models.")
    parser.add_argument("--version", action="version", version=f"llm-mcp {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the MCP server (default command)")
    _add_common(serve)
    serve.add_argument("--transport", choices=["stdio", "sse", "streamable-http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="bind address for HTTP transports (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--auth-token-file", metavar="FILE", help="file holding the bearer token (or LLM_MCP_AUTH_TOKEN)"
    )
    serve.add_argument(
        "--allowed-host", action="append", metavar="NAME", help="extra Host header value to accept on HTTP (repeatable)"
    )
    serve.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log level (logs always go to stderr)",
    )
    serve.add_argument(
        "--sampler",
        choices=["auto", "transformers", "vllm"],
        help="sample backend (default LLM_MCP_SAMPLER or auto: vLLM when installed, else in-process)",
    )
    serve.add_argument(
        "--vllm-url",
        metavar="URL",
        help="use this running vLLM server (LLM_MCP_VLLM_URL; key in LLM_MCP_VLLM_API_KEY) "
        "instead of starting managed ones",
    )
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="print the support matrix, or --check a matrix file")
    _add_common(models)
    models.add_argument("--check", action="store_true", help="validate the matrix and exit")
    models.add_argument("--method", choices=["lora", "qlora", "dora", "sparse"])
    models.add_argument("--fits", action="store_true", help="only models that fit this machine")
    models.set_defaults(func=cmd_models)

    tiny = sub.add_parser("make-tiny-model", help="build a tiny random-init Llama + tokenizer offline")
    tiny.add_argument("dir")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)

    jobs = sub.add_parser("jobs", help="list jobs, or show / follow / cancel one (same data as job_status)")
    _add_common(jobs)
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--follow", "-f", action="store_true", help="show a progress bar until the job ends")
    jobs.add_argument("--cancel", action="store_true", help="cancel the job (checkpoint, then stop)")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)

    bench = sub.add_parser("bench", help="benchmarks: our path and its baseline side by side")
    bench.add_argument("which", choices=["train", "methods", "server", "sample"])
    bench.add_argument("--out", metavar="DIR", help="results directory (default bench-results/<which>-<time>)")
    bench.add_argument("--reps", type=int, default=3, help="repetitions of each side (alternating)")
    bench.add_argument("--steps", type=int, help="training steps per run (default 12; 3 with --tiny)")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--tiny", action="store_true", help="the test model and short runs (a smoke test)")
    bench.add_argument(
        "--workload", choices=["prompt-heavy", "chat"], help="train: only this workload shape (default: both)"
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="train: cuda runs Qwen2.5-0.5B-shaped models in bf16 and adds TRL's SFTTrainer, MFU and "
        "the memory estimate vs the measured peak",
    )
    bench.add_argument("--no-vllm", action="store_true", help="sample: the in-process side only, no vLLM server")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="build a tiny model and drive the server through a real MCP client")
    demo.set_defaults(func=cmd_demo)

    reference = sub.add_parser("reference", help="print the tool reference (docs/tools.md) from the tool schemas")
    reference.set_defaults(func=cmd_reference)

    gguf = sub.add_parser("setup-gguf", help="unpack llama.cpp's converter from the installed llama-cpp-python's sdist")
    gguf.add_argument("--sdist", metavar="FILE", help="a llama-cpp-python .tar.gz already here (no download)")
    gguf.set_defaults(func=setup_command)
    return parser


def cmd_reference(args: argparse.Namespace) -> int:
    from llm_mcp.tools.reference import render

    sys.stdout.write(render())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`llm-mcp models | head -1`): stop quietly, as SIGPIPE would (stdout to /dev/null)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, the status a shell reports for a process that SIGPIPE ended
    except LlmMcpError as exc:
        print(f"llm-mcp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
