"""Small file helpers shared by the callbacks, commands and benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch.distributed as dist


def write_json(path: Union[str, Path], payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically (tmp file + rename), parents created; rank 0 only when distributed.

    Args:
        path: the file to write.
        payload: anything ``json.dumps`` accepts.
    """
    path = Path(path)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
