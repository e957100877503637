"""Safety-preservation benchmark: align SmolLM2, attack it with poisoned GSM8K fine-tuning, compare methods.

Run ``python -m benchmarks.safety.run --profile cpu`` (see ``run.py``).
"""
