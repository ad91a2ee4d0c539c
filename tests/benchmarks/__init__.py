"""Tests of the scripts under benchmarks/, run on the CPU."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def load_benchmark(filename: str, name: str):
    """Import the script ``benchmarks/<filename>`` as module ``name`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, filename))
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses look their module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
