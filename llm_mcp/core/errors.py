"""One error root for the project.

Every anticipated failure is an `LlmMcpError`. It does not depend on the MCP SDK: the
training process, export and the CLI raise it without importing `mcp`. The tool boundary
(`llm_mcp.tools.common.tool_errors`) converts it into the SDK's `ToolError`, the only
exception whose message reaches the model in mcp 2.x. Each subclass also inherits the
stdlib error it stands in for, so plain Python callers can catch either.

Messages are the agent's UI: name the field, the bad value (with !r), the allowed
values, and what to do next.
"""

from __future__ import annotations


class LlmMcpError(Exception):
    """Root of every error llm_mcp raises on purpose."""


class ConfigurationError(LlmMcpError, ValueError):
    """A configuration file or setting is malformed (models.yaml, configs/, environment)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class InvalidArgumentError(LlmMcpError, ValueError):
    """A tool or CLI argument is out of range, of the wrong kind, or inconsistent."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems with the request:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)


class UnknownModelError(LlmMcpError, LookupError):
    """The model id is neither in the support matrix nor an allowed local directory."""


class PathNotAllowedError(LlmMcpError, PermissionError):
    """A path points outside the allowed roots (or is a symlink / special file)."""


class DataError(InvalidArgumentError):
    """The dataset cannot be used: unreadable, unknown format, or bad rows (with line numbers)."""
