"""`python -m llm_mcp` = the `llm-mcp` command."""

import sys

from llm_mcp.cli import main

if __name__ == "__main__":
    sys.exit(main())
