"""The SDK's protobuf schema, loaded without importing the `tinker` package.

`import tinker` pulls in torch, and the gateway must stay free of torch (ARCHITECTURE.md);
so the generated module is loaded straight from the installed wheel's file. Its only
imports are google.protobuf's. If the tinker package is already imported (tests run the
SDK in-process), its module is reused so the descriptor pool holds one copy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load():
    loaded = sys.modules.get("tinker.proto.tinker_public_pb2")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("tinker")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tinker package (its protobuf schema) is not installed: pip install tinker==0.38.0")
    path = Path(spec.submodule_search_locations[0]) / "proto" / "tinker_public_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("tinker.proto.tinker_public_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


pb = _load()
