"""Reading the project's YAML files (params, launch profiles, published numbers) with one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import BitbenchError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of `path`; a missing file or invalid YAML raises BitbenchError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise BitbenchError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BitbenchError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
