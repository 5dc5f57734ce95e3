"""The README's porting section: a script written against accelerate's big-model API, with its
import line changed to ``bigmodel.accelerate``, gives the same outputs on a tiny transformers
model loaded with part of it on disk."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

SCRIPT = """
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained(CHECKPOINT)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config)
model = load_checkpoint_and_dispatch(
    model,
    CHECKPOINT,
    device_map="sequential",
    max_memory={"cpu": BUDGET, "disk": None},
    no_split_module_classes=model._no_split_modules,
    offload_folder=OFFLOAD,
)
logits = model(IDS).logits
"""


def _run(script: str, checkpoint: str, offload: str) -> dict[str, object]:
    scope: dict[str, object] = {
        "CHECKPOINT": checkpoint,
        "OFFLOAD": offload,
        "BUDGET": 60_000,
        "IDS": torch.tensor([[1, 5, 9, 2, 7]]),
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exec(compile(script, "<ported script>", "exec"), scope)
    return scope


def test_an_accelerate_script_ported_by_changing_its_import_gives_the_same_logits(tmp_path):
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie=False))
    model.save_pretrained(tmp_path / "ckpt")
    expected = model(torch.tensor([[1, 5, 9, 2, 7]])).logits

    ported = SCRIPT.replace("from accelerate import", "from bigmodel.accelerate import")
    assert ported != SCRIPT
    theirs = _run(SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "a"))
    ours = _run(ported, str(tmp_path / "ckpt"), str(tmp_path / "b"))
    assert "disk" in ours["model"].hf_device_map.values()  # the budget sends part of it to disk
    # the maps may differ only where bigmodel fills the cpu budget (a norm after a layer that
    # did not fit); what runs is the same
    assert set(ours["model"].hf_device_map) >= {"model.embed_tokens", "lm_head"}
    assert torch.equal(ours["logits"], theirs["logits"])
    torch.testing.assert_close(ours["logits"], expected.detach(), rtol=0, atol=1e-5)


def _readme_porting_section() -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("### Porting from accelerate")
    return readme[start : readme.index("\n### ", start + 1)]


def test_the_readme_porting_section_shows_the_one_line_change_and_lists_every_drop_in_name():
    import re

    import bigmodel.accelerate

    section = _readme_porting_section()
    removed = re.search(r"^- (from accelerate import .+)$", section, re.MULTILINE)
    added = re.search(r"^\+ (from bigmodel\.accelerate import .+)$", section, re.MULTILINE)
    assert removed and added
    assert added.group(1) == removed.group(1).replace("accelerate", "bigmodel.accelerate", 1)
    assert SCRIPT.lstrip().startswith(removed.group(1))  # the script above is the README's
    exec(added.group(1), {})  # the ported import line works as written
    listed = set(re.findall(r"`([a-z_]+)`", section)) & set(bigmodel.accelerate.__all__)
    public_functions = {n for n in bigmodel.accelerate.__all__ if n[0].islower()}
    assert listed == public_functions
