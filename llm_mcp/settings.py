"""Where llm_mcp keeps its state and which files it reads, from the environment and the CLI.

Environment variables (CLI flags override them):
  LLM_MCP_HOME           state directory (jobs, exports, local models); default ~/.llm_mcp
  LLM_MCP_MODELS         path of the model support matrix; default the bundled models.yaml
  LLM_MCP_ALLOWED_ROOTS  extra directories (os.pathsep-separated) that datasets, local models
                         and exports may live under; LLM_MCP_HOME is always allowed
  LLM_MCP_AUTH_TOKEN     bearer token required by the HTTP transports
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llm_mcp.errors import ConfigurationError, PathNotAllowedError

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """Locate a bundled data file (models.yaml, configs/...).

    A source checkout or editable install reads the repository's top-level copy; a wheel
    carries the same files under llm_mcp/data/.
    """
    for candidate in (_PACKAGE_DIR.parent / name, _PACKAGE_DIR / "data" / name):
        if candidate.exists():
            return candidate
    raise ConfigurationError(f"bundled file {name!r} not found next to the llm_mcp package; reinstall llm-mcp")


@dataclass
class Settings:
    """Resolved runtime settings. Build with `Settings.from_env()` and override fields from the CLI."""

    home: Path
    models_path: Path
    allowed_roots: list[Path] = field(default_factory=list)
    auth_token: str | None = None

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
        )

    @property
    def roots(self) -> list[Path]:
        """Every directory user-supplied paths may point into, resolved; the state dir first."""
        out: list[Path] = []
        for root in [self.home, *self.allowed_roots]:
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

    def check_path(self, value: str | os.PathLike[str], field_name: str) -> Path:
        """Resolve a user-supplied path and require it to lie under an allowed root.

        Symlinks are resolved before the check, so a link that points outside is refused.

        Raises:
            PathNotAllowedError: the resolved path is outside every allowed root.
        """
        raw = Path(value).expanduser()
        resolved = raw.resolve()
        for root in self.roots:
            if resolved == root or resolved.is_relative_to(root):
                return resolved
        allowed = ", ".join(str(r) for r in self.roots)
        raise PathNotAllowedError(
            f"{field_name}={str(value)!r} resolves to {str(resolved)!r}, which is outside the allowed roots "
            f"({allowed}). Move or copy it under one of them, or start the server with "
            f"--allow-root DIR / LLM_MCP_ALLOWED_ROOTS."
        )
