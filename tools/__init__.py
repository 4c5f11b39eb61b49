"""MCP tools. Importing the package registers every tool in ``tools.registry.TOOLS``."""

from . import files, memory, query, search, status  # noqa: F401  (registration side effects)
