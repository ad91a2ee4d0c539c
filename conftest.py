import os
import sys

# Tests import the three top-level packages from the checkout even when it is not pip-installed.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The pipeline lints the graph after every pass, not only the lowered one: a pass that leaves a
# value read before its definition is named where it happens (passes/pipeline.py).
os.environ.setdefault("SHARDGRAPH_LINT_EACH_PASS", "1")
