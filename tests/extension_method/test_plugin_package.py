"""A method shipped as its own installed distribution: an entry point in the group "peft_ext.methods" registers it
on `import peft_ext` (so through the start-up hook too, with no import in the user's script), its adapters name
that distribution as their requirement, and `peft-ext train --import` runs a method that is only on PYTHONPATH.
Each case runs in a fresh process over a site folder built here (the SCALE method's files, renamed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

SCALE_FOLDER = Path(__file__).parent / "scale_method"


def _plugin_source(root: Path, package: str = "scale_plugin") -> Path:
    folder = root / package
    folder.mkdir(parents=True)
    for source in SCALE_FOLDER.glob("*.py"):
        text = source.read_text().replace("tests.extension_method.scale_method", package)
        (folder / source.name).write_text(text)
    return folder


def _dist_info(root: Path, entry_point: str, name: str = "scale-plugin", version: str = "0.3.0") -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[peft_ext.methods]\nscale = {entry_point}\n")
    (info / "top_level.txt").write_text("scale_plugin\n")
    (info / "RECORD").write_text("")


def _run(code: str, cwd: Path, site_dir: Path | None = None, env: dict | None = None, timeout: int = 300):
    prelude = f"import site; site.addsitedir({str(site_dir)!r})\n" if site_dir else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


TINY = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
"""


def test_an_installed_method_registers_itself_and_loads_without_any_import(tmp_path):
    site_dir = tmp_path / "site"
    _plugin_source(site_dir)
    _dist_info(site_dir, "scale_plugin")
    save = _run(TINY + f"""
import json, peft_ext
from peft import get_peft_model
assert "SCALE" in peft_ext.registered_methods(), peft_ext.registered_methods()
from scale_plugin import ScaleConfig
model = get_peft_model(tiny(), ScaleConfig(init_weights=False))
model.save_pretrained({str(tmp_path / 'adapter')!r})
torch.save(model(ids).logits.detach(), {str(tmp_path / 'expected.pt')!r})
print(json.load(open({str(tmp_path / 'adapter' / 'adapter_config.json')!r}))["peft_ext_requirement"])
""", tmp_path, site_dir)
    assert save.returncode == 0, save.stderr[-3000:]
    assert save.stdout.strip().splitlines()[-1] == "scale-plugin>=0.3.0"  # the distribution, not peft-ext
    load = _run(TINY + f"""
import sys
from peft import PeftModel  # no import of peft_ext or scale_plugin: the start-up hook, then the entry point
model = PeftModel.from_pretrained(tiny(), {str(tmp_path / 'adapter')!r})
assert torch.equal(model(ids).logits, torch.load({str(tmp_path / 'expected.pt')!r}))
print("loaded by", "scale_plugin" in sys.modules and "peft_ext" in sys.modules)
""", tmp_path, site_dir)
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.strip().splitlines()[-1] == "loaded by True"


def test_a_broken_method_package_warns_and_peft_ext_still_imports(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    _dist_info(site_dir, "broken_plugin", name="broken-plugin")
    result = _run("import warnings\nwarnings.simplefilter('always')\nimport peft_ext\nprint('imported')", tmp_path, site_dir)
    assert result.returncode == 0 and result.stdout.strip().endswith("imported"), result.stderr[-3000:]
    assert "broken_plugin" in result.stderr and "failed to import" in result.stderr and "broken on purpose" in result.stderr


def test_peft_ext_train_imports_a_method_that_is_only_on_the_path(tmp_path):
    _plugin_source(tmp_path / "src")
    recipe = {
        "model": "tiny-llama", "data": "fictional-facts", "trainer": "sft", "output_dir": str(tmp_path / "out"),
        "method": {"peft_type": "SCALE", "init_weights": False},
        "trainer_args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 32},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = "import sys\nfrom peft_ext.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {"PYTHONPATH": str(tmp_path / "src")}
    without = subprocess.run(
        [sys.executable, "-c", cli, "train", str(tmp_path / "recipe.yaml")], cwd=tmp_path, capture_output=True,
        text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip
    assert without.returncode != 0 and "unknown peft_type 'SCALE'" in without.stderr and "--import" in without.stderr
    with_import = subprocess.run(
        [sys.executable, "-c", cli, "train", str(tmp_path / "recipe.yaml"), "--import", "scale_plugin"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip
    assert with_import.returncode == 0, with_import.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert '"peft_type": "SCALE"' in (tmp_path / "out" / "adapter_config.json").read_text()
