"""Plain PEFT code loads a peft-ext adapter without `import peft_ext`, thanks to the installed startup hook."""

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import torch
from peft import get_peft_model

from peft_ext import HftConfig

REPO = Path(__file__).resolve().parents[2]

LOAD_WITHOUT_IMPORT = textwrap.dedent(
    """
    import sys, torch
    {setup}
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import PeftModel
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    model = PeftModel.from_pretrained(base, sys.argv[1])
    torch.save(model(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])
    print("peft_ext imported by:", "hook" if "peft_ext" in sys.modules else "nobody")
    """
)


def _save_trained_adapter(tmp_path, llama):
    model = get_peft_model(llama(layers=2), HftConfig(init_weights=False))
    x = torch.randint(0, 64, (2, 5))
    torch.save(x, tmp_path / "x.pt")
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        return model(x).logits


def _run(code: str, tmp_path, env=None):
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "adapter"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_installed_hook_loads_adapters_in_a_fresh_process(tmp_path, llama):
    assert (Path(sysconfig.get_paths()["purelib"]) / "peft_ext_autoload.pth").exists(), "pip install peft-ext first"
    expected = _save_trained_adapter(tmp_path, llama)
    result = _run(LOAD_WITHOUT_IMPORT.format(setup=""), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peft_ext imported by: hook" in result.stdout
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_without_the_hook_plain_peft_fails_and_the_config_names_the_package(tmp_path, llama):
    _save_trained_adapter(tmp_path, llama)
    result = _run(LOAD_WITHOUT_IMPORT.format(setup=""), tmp_path, env={"PEFT_EXT_NO_AUTOLOAD": "1"})
    assert result.returncode != 0 and "KeyError: 'HFT'" in result.stderr
    # what a user without peft-ext sees in the folder
    assert '"peft_ext_requirement": "peft-ext>=' in (tmp_path / "adapter" / "adapter_config.json").read_text()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "peft-ext" in card and "hft" in card


def test_the_wheel_ships_the_hook(tmp_path, llama):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("peft_ext-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("peft_ext_autoload.pth") == (REPO / "peft_ext_autoload.pth").read_bytes()
    assert "_peft_ext_autoload.py" in names and "peft_ext/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels` package
    # a site dir holding only the wheel's files (as pip lays them out) makes PEFT load HFT adapters
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    expected = _save_trained_adapter(tmp_path, llama)
    setup = f"import site; site.addsitedir({str(site)!r})"
    result = _run(LOAD_WITHOUT_IMPORT.format(setup=setup), tmp_path, env={"PEFT_EXT_NO_AUTOLOAD": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_a_stale_pth_without_its_module_stays_silent(tmp_path):
    """An uninstalled or moved editable install can leave the .pth behind: Python must start without a traceback."""
    (tmp_path / "peft_ext_autoload.pth").write_bytes((REPO / "peft_ext_autoload.pth").read_bytes())
    code = f"import site; site.addsitedir({str(tmp_path)!r}); print('started')"
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "started" and result.stderr == "", result.stderr
