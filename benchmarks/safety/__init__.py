"""Safety-preservation benchmark: align SmolLM2, attack it with poisoned GSM8K fine-tuning, compare methods.

Run ``python benchmarks/safety/run.py --profile cpu`` (see ``run.py``).
"""
