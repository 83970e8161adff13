"""Where llm_mcp keeps its state and which files it reads, from the environment and the CLI.

Environment variables (CLI flags override them):
  LLM_MCP_HOME           state directory (jobs, exports, local models); default ~/.llm_mcp
  LLM_MCP_MODELS         path of the model support matrix; default the bundled models.yaml
  LLM_MCP_ALLOWED_ROOTS  extra directories (os.pathsep-separated) that datasets, local models
                         and exports may live under; LLM_MCP_HOME is always allowed
  LLM_MCP_AUTH_TOKEN     bearer token required by the HTTP transports
  LLM_MCP_SAMPLER        sample backend: auto (default; vLLM when installed), transformers, vllm
  LLM_MCP_VLLM_URL       use this running vLLM OpenAI-compatible server instead of managed ones
  LLM_MCP_VLLM_API_KEY   its API key
  LLM_MCP_VLLM_IDLE_S    stop a managed vLLM server after this many idle seconds (default 900; 0 = never)
  LLM_MCP_VLLM_ARGS      extra `vllm serve` arguments for managed servers
  LLM_MCP_EXECUTOR       where jobs run: local (default), slurm or ray (llm_mcp.jobs.executor)
  LLM_MCP_CLUSTER_PYTHON the Python (with llm-mcp installed) that cluster nodes run jobs with; default this one
  LLM_MCP_CLUSTER_GPU_MEMORY_GB  memory of one cluster GPU, which neither engine reports (default 80)
  LLM_MCP_CLUSTER_IFNAME the network interface a multi-node job's processes talk over (GLOO_SOCKET_IFNAME and
                         NCCL_SOCKET_IFNAME on every node); default: gloo's and NCCL's own choice
  LLM_MCP_REWARD_URLS    URLs (comma-separated prefixes) a GRPO job's http grader may call besides loopback ones
  LLM_MCP_SLURM_PARTITION / _ACCOUNT / _QOS / _TIME / _CONSTRAINT   sbatch defaults (a request may override)
  LLM_MCP_SLURM_ARGS     extra sbatch options for every job (operator-only, e.g. "--mem=0 --exclusive")
  LLM_MCP_RAY_ADDRESS    the Ray dashboard address for the ray executor (default http://127.0.0.1:8265)
  LLM_MCP_MAX_QUEUED     start_finetune refuses a job when this many are already queued (default 16)
  LLM_MCP_SESSION_IDLE_S an HTTP session with no request for this long is closed (default 300)
  LLM_MCP_MAX_SESSIONS   HTTP sessions open at once; more are refused until one closes (default 256)
  LLM_MCP_SAMPLE_TIMEOUT_S  one sample call generates for at most this long (default 45)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llm_mcp.core.errors import ConfigurationError, PathNotAllowedError
from llm_mcp.core.folders import config_line, folder_of, not_offerable, remembered, secret

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # llm_mcp/


def data_path(name: str) -> Path:
    """Locate a bundled data file (models.yaml, configs/...).

    A source checkout or editable install reads the repository's top-level copy; a wheel
    carries the same files under llm_mcp/data/.
    """
    for candidate in (_PACKAGE_DIR.parent / name, _PACKAGE_DIR / "data" / name):
        if candidate.exists():
            return candidate
    raise ConfigurationError(f"bundled file {name!r} not found next to the llm_mcp package; reinstall llm-mcp")


SAMPLERS = ("auto", "transformers", "vllm")
# Settings key -> LLM_MCP_SLURM_<NAME>
SLURM_SETTINGS = {
    "partition": "PARTITION",
    "account": "ACCOUNT",
    "qos": "QOS",
    "time_limit": "TIME",
    "constraint": "CONSTRAINT",
    "sbatch_args": "ARGS",
}


def _float_env(env: dict[str, str], name: str, default: float) -> float:
    value = env.get(name)
    try:
        number = default if value in (None, "") else float(value)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a number; unset it or give e.g. {default:g}") from None
    if not number >= 0 or number == float("inf"):
        raise ConfigurationError(f"{name}={value!r} must be a finite number >= 0; unset it or give e.g. {default:g}")
    return number


@dataclass
class Settings:
    """Resolved runtime settings. Build with `Settings.from_env()` and override fields from the CLI."""

    home: Path
    models_path: Path
    allowed_roots: list[Path] = field(default_factory=list)
    auth_token: str | None = None
    sampler: str = "auto"
    vllm_url: str | None = None
    vllm_api_key: str | None = None
    vllm_idle_s: float = 900.0
    vllm_args: str = ""
    executor: str = "local"
    cluster_python: str | None = None
    cluster_gpu_memory_gb: float = 80.0
    cluster_ifname: str | None = None
    slurm: dict[str, str] = field(default_factory=dict)
    ray_address: str = "http://127.0.0.1:8265"
    max_queued: int = 16
    session_idle_s: float = 300.0
    max_sessions: int = 256
    sample_timeout_s: float = 45.0

    def __post_init__(self) -> None:
        # Job processes run with their job directory as cwd: a relative home must not follow them there.
        self.home = Path(self.home).expanduser().absolute()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("LLM_MCP_HOME") or Path.home() / ".llm_mcp").expanduser()
        models = env.get("LLM_MCP_MODELS")
        roots = [Path(p).expanduser() for p in env.get("LLM_MCP_ALLOWED_ROOTS", "").split(os.pathsep) if p]
        return cls(
            home=home,
            models_path=Path(models).expanduser() if models else data_path("models.yaml"),
            allowed_roots=roots,
            auth_token=env.get("LLM_MCP_AUTH_TOKEN") or None,
            sampler=env.get("LLM_MCP_SAMPLER") or "auto",
            vllm_url=env.get("LLM_MCP_VLLM_URL") or None,
            vllm_api_key=env.get("LLM_MCP_VLLM_API_KEY") or None,
            vllm_idle_s=_float_env(env, "LLM_MCP_VLLM_IDLE_S", 900.0),
            vllm_args=env.get("LLM_MCP_VLLM_ARGS", ""),
            executor=env.get("LLM_MCP_EXECUTOR") or "local",
            cluster_python=env.get("LLM_MCP_CLUSTER_PYTHON") or None,
            cluster_gpu_memory_gb=_float_env(env, "LLM_MCP_CLUSTER_GPU_MEMORY_GB", 80.0) or 80.0,
            cluster_ifname=env.get("LLM_MCP_CLUSTER_IFNAME") or None,
            slurm={
                key: env[f"LLM_MCP_SLURM_{name}"]
                for key, name in SLURM_SETTINGS.items()
                if env.get(f"LLM_MCP_SLURM_{name}")
            },
            ray_address=env.get("LLM_MCP_RAY_ADDRESS") or "http://127.0.0.1:8265",
            max_queued=int(_float_env(env, "LLM_MCP_MAX_QUEUED", 16)),
            session_idle_s=_float_env(env, "LLM_MCP_SESSION_IDLE_S", 300.0),
            max_sessions=max(1, int(_float_env(env, "LLM_MCP_MAX_SESSIONS", 256))),
            sample_timeout_s=_float_env(env, "LLM_MCP_SAMPLE_TIMEOUT_S", 45.0),
        )

    def sample_backend(self) -> str:
        """The sampler to use: 'vllm' or 'transformers' ('auto': vLLM when installed or a URL is set)."""
        if self.sampler not in SAMPLERS:
            raise ConfigurationError(
                f"sampler={self.sampler!r}; allowed: {list(SAMPLERS)} (--sampler / LLM_MCP_SAMPLER)"
            )
        if self.sampler != "auto":
            return self.sampler
        import importlib.util

        return "vllm" if self.vllm_url or importlib.util.find_spec("vllm") else "transformers"

    @property
    def roots(self) -> list[Path]:
        """Every directory user-supplied paths may point into, resolved; the state dir first."""
        out: list[Path] = []
        for root in [self.home, *self.allowed_roots, *remembered(self.home)]:
            resolved = root.expanduser().resolve()
            if resolved not in out:
                out.append(resolved)
        return out

    def ensure_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the state directory LLM_MCP_HOME={str(self.home)!r}: {exc.strerror}. "
                "Point LLM_MCP_HOME at a writable directory."
            ) from exc

    def display(self, path: Path) -> str:
        """How a path is shown to a caller: relative to the state directory when it is under it."""
        home = self.home.resolve()
        return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)

    def under_home(self, value: str | os.PathLike[str]) -> Path:
        """A caller's path as given (with ~ expanded) if absolute, else relative to the state directory."""
        raw = Path(str(value)).expanduser()
        return raw if raw.is_absolute() else self.home / raw

    def check_path(self, value: str | os.PathLike[str], field_name: str) -> Path:
        """Resolve a user-supplied path and require it to lie under an allowed root.

        Symlinks are resolved before the check, so a link that points outside is refused.

        Raises:
            PathNotAllowedError: the resolved path is outside every allowed root.
        """
        text = os.fspath(value)
        if "\x00" in text:
            raise PathNotAllowedError(f"{field_name}={text!r} contains a NUL byte; give a plain file path")
        if len(text) > 4096 or any(len(part) > 255 for part in Path(text).parts):
            raise PathNotAllowedError(
                f"{field_name}: the path is too long (at most 255 characters per component and "
                "4096 in all); give a shorter path"
            )
        raw = Path(value).expanduser()
        try:
            resolved = raw.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop, a component that is not a directory, ...
            raise PathNotAllowedError(
                f"{field_name}={text!r} cannot be resolved ({exc}); give an existing path under an allowed root"
            ) from None
        if why := secret(resolved):
            raise PathNotAllowedError(f"{field_name}={text!r} is never read: {why}")
        for root in self.roots:
            if resolved == root or resolved.is_relative_to(root):
                return resolved
        allowed = ", ".join(str(r) for r in self.roots)
        folder = folder_of(resolved)
        why = not_offerable(folder, self.home)
        reach = (
            f"it cannot be allowed ({why}); copy the data elsewhere"
            if why
            else f"to read {folder}, the user allows it when this server asks (a client with MCP elicitation "
            f"asks at once), or {config_line(folder)}"
        )
        raise PathNotAllowedError(
            f"{field_name}={str(value)!r} resolves to {str(resolved)!r}, which is outside the allowed roots "
            f"({allowed}). Next: {reach}. Rows you compose yourself: save_dataset writes them into "
            f"{self.home / 'data'}."
        )
