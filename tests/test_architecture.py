"""The package's shape, checked: the layering contracts (pyproject.toml, `lint-imports`), a command line that
answers without torch, and a stage order that the pipeline, the CLI and the stage modules agree on."""

from __future__ import annotations

import importlib
import subprocess
import sys

from rlrec.cli import COMMANDS
from rlrec.recipe import STAGES, Recipe
from tests.conftest import REPO


def test_import_layers_and_no_cycles():
    """import-linter over the whole package (function-local imports included): a library importing a stage or
    the recipe, or any cycle inside a package, fails here."""
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_help_and_config_errors_do_not_import_torch(tmp_path):
    """`rlrec --help`, a recipe error and a misspelled reward answer at once: the command line, the recipe schema
    and the reward names import no torch."""
    probe = ("import sys; from rlrec.cli import main; code = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsft: {trian: {}}\n")
    result = subprocess.run([sys.executable, "-c", probe, "sft", "--config", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr, result.stderr
    typo = tmp_path / "typo.yaml"  # a misspelled reward: named with the nearest one before any model loads
    typo.write_text("name: x\ngrpo: {rewards: {hti: 1.0}}\n")
    for command in (["grpo", "--config", str(typo)], ["pipeline", "--config", str(typo)]):
        result = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 2 and "unknown reward 'hti': did you mean 'hit'?" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-c", "import sys; from rlrec.cli import build_parser; "
                             "build_parser().format_help(); assert 'torch' not in sys.modules"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_every_stage_is_a_module_with_run_and_report_and_has_a_command():
    """Adding a stage: its module `rlrec.stages.<name>` (run + report), its row in STAGES, its row in COMMANDS."""
    commands = {target for _, target in COMMANDS.values() if isinstance(target, str)}
    for stage in STAGES:
        module = importlib.import_module(f"rlrec.stages.{stage.name}")
        assert callable(module.run) and callable(module.report), stage.name
        assert stage.name in commands, f"no CLI command runs the '{stage.name}' stage"
        assert not stage.optional or stage.name in Recipe.__dataclass_fields__, stage.name
        if stage.launched:
            assert callable(module.main), f"{stage.name} runs under accelerate launch and needs main()"
