"""The Quickstart demo as a script: `python examples/quickstart.py` (same as `llm402 demo`)."""

from llm402.demo import run_demo

if __name__ == "__main__":
    run_demo()
