"""Folders the user allowed: where their own files may be read from, beyond the configured roots.

A tool given a path outside every allowed root asks the user (MCP elicitation) to allow the folder that
holds it; the answer is remembered in LLM_MCP_HOME/allowed_folders.json. Some folders are never allowed,
whatever the user answers or the configuration says: credentials and keys, system directories, and the
state directory's own internals (the job store and job directories).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm_mcp.core import atomic

REMEMBERED = "allowed_folders.json"
# Under the user's home: never readable, nor a folder that holds them.
SECRET_DIRS = (
    ".ssh",
    ".aws",
    ".gnupg",
    ".kube",
    ".docker",
    ".azure",
    ".config/gcloud",
    ".config/gh",
    ".password-store",
)
SECRET_FILES = (
    ".env",
    ".netrc",
    ".git-credentials",
    ".pgpass",
    ".npmrc",
    ".pypirc",
    "credentials",
    "id_rsa",
    "id_ed25519",
)
SYSTEM_DIRS = ("/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/dev", "/proc", "/sys", "/run")
STATE_INTERNALS = ("jobs", "jobs.db", "jobs.db-wal", "jobs.db-shm", REMEMBERED)


def remembered(home: Path) -> list[Path]:
    """The folders the user allowed, as remembered in the state directory."""
    try:
        data = json.loads((home / REMEMBERED).read_text())
    except (OSError, ValueError):
        return []
    return [Path(p) for p in data if isinstance(p, str)] if isinstance(data, list) else []


def remember(home: Path, folder: Path) -> None:
    """Add `folder` to the remembered allowed folders (whole, or not at all)."""
    known = [str(p) for p in remembered(home)]
    if str(folder) not in known:
        home.mkdir(parents=True, exist_ok=True)
        atomic.replace(home / REMEMBERED, json.dumps([*known, str(folder)], indent=2).encode())


def folder_of(path: Path) -> Path:
    """The folder to allow for `path`: the directory itself, or the one a file is in (symlinks resolved)."""
    resolved = path.expanduser().resolve()
    return resolved if resolved.is_dir() else resolved.parent


def secret(path: Path) -> str | None:
    """Why `path` (resolved) is never read whatever the roots say (credentials and keys), or None."""
    user_home = Path.home().resolve()
    for name in SECRET_DIRS:
        where = user_home / name
        if path == where or path.is_relative_to(where):
            return f"it is in {where} (credentials and keys are never read)"
    if path.name in SECRET_FILES or path.name.startswith(".env"):
        return "it is a credentials file (never read)"
    return None


def not_offerable(folder: Path, home: Path) -> str | None:
    """Why the user may not be asked to allow `folder` (resolved), or None."""
    user_home, state = Path.home().resolve(), home.resolve()
    if why := secret(folder):
        return why
    holds = [user_home / name for name in SECRET_DIRS if (user_home / name).is_relative_to(folder)]
    if holds:
        return f"it holds {holds[0]} (credentials and keys are never read); allow the folder with your data instead"
    if folder.is_relative_to(state):
        inside = folder.relative_to(state).parts
        if inside and inside[0] in STATE_INTERNALS:
            return "it is inside the state directory's own internals (jobs and the job store)"
    elif any(folder == Path(d) or folder.is_relative_to(d) for d in SYSTEM_DIRS[1:]) or folder == Path("/"):
        return "it is a system directory"
    return None


def config_line(folder: Path) -> str:
    """The exact settings that allow `folder` without asking, for the user's MCP client configuration."""
    roots = os.pathsep.join(dict.fromkeys([*filter(None, os.environ.get("LLM_MCP_ALLOWED_ROOTS", "").split(os.pathsep)),
                                           str(folder)]))  # fmt: skip
    return (
        f'add "LLM_MCP_ALLOWED_ROOTS": "{roots}" to the "env" of the llm-mcp server in claude_desktop_config.json '
        f"(Claude Code: claude mcp add llm-mcp -e LLM_MCP_ALLOWED_ROOTS={roots} -- ...; or start the server with "
        f"--allow-root {folder}), then restart the server"
    )
