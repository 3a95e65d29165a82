"""docs/CONFIG.md is generated from megatron_copd/config.py and must be up to date."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

from megatron_copd import config

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gen_config_docs.py"


def _tool():
    spec = importlib.util.spec_from_file_location("gen_config_docs", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being created
    spec.loader.exec_module(mod)
    return mod


def test_config_md_is_up_to_date():
    p = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr + "(run: python tools/gen_config_docs.py)"


def test_every_dataclass_field_is_documented_with_its_docstring():
    gen = _tool()
    parsed = gen.parse((REPO / "megatron_copd" / "config.py").read_text())
    text = (REPO / "docs" / "CONFIG.md").read_text()
    for name, cls in parsed.items():
        real = getattr(config, name)
        assert [f.name for f in cls.fields] == [f.name for f in dataclasses.fields(real)], name
    # Spot checks: nested keys, list sections, docstrings and YAML-style defaults.
    assert "| `model.vision.patch_size` | `int` | `8` |" in text
    assert "| `branches[].beta` | `float` | `1.0` | OPD advantage scale" in text
    assert "| `schedule.edges[].teacher` | `str` | required |" in text
    assert (
        "| `precision.fp8` | `'delayed' \\| 'tensorwise' \\| 'blockwise' \\| 'mxfp8' \\| null` |"
        in (text)
    )


def test_docstring_parsing_on_a_small_source():
    gen = _tool()
    src = '''
from dataclasses import dataclass, field

@dataclass
class Inner:
    """Inner doc."""
    x: int = 3
    """The x,
    over two lines."""
    y: str | None = None

@dataclass
class RunConfig:
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
'''
    classes = gen.parse(src)
    assert [(f.name, f.default, f.doc) for f in classes["Inner"].fields] == [
        ("x", "3", "The x, over two lines."),
        ("y", "null", ""),
    ]
    md = gen.render(classes)
    assert "## `inner` (Inner)" in md and "## `items[]` (Inner)" in md
    assert "| `inner.x` | `int` | `3` | The x, over two lines. |" in md
