"""`python -m peft_ext.experiments.<reproduction> RECIPE [--set key=value] [--out DIR]`: the command line that every
reproduction module shares (`peft-ext reproduce-*` runs the same functions)."""

from __future__ import annotations

import argparse
from typing import Callable, Optional


def recipe_main(doc: str, example: str, load: Callable, reproduce: Callable, argv: Optional[list] = None) -> None:
    """Parse RECIPE, --set and --out, then `reproduce(load(recipe, overrides), out)`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a YAML file, e.g. {example}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--out", default=None, help="output folder (default: the recipe's output_dir)")
    args = parser.parse_args(argv)
    reproduce(load(args.recipe, args.set), args.out)
