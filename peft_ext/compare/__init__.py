"""`peft-ext compare`: every method on one model and one data set, side by side, under the same budget.

    from peft_ext.compare import compare
    results = compare("recipes/compare_own_data.yaml")          # or compare() for the built-in default
    results = compare(CompareConfig(model="tiny-llama"), ["max_steps=5"])   # overrides apply to an object too

See docs/compare.md.
"""

from .config import CompareConfig, builtin_default
from .runner import compare, run_compare

__all__ = ["CompareConfig", "builtin_default", "compare", "run_compare"]
